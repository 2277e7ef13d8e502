"""repmgr-vip: one virtual IP on the primary of a repmgr cluster, never on two nodes."""

__version__ = "0.1.0"
