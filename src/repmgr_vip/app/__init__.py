"""Application: hooks, daemon, fencing and status, built from the core and the adapters."""
