"""Adapters: the only code that touches the host (addresses, ARP, SSH, PostgreSQL, files)."""
