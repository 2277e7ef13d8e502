"""Configuration: the TOML schema, repmgr.conf and conninfo parsing, migration."""
