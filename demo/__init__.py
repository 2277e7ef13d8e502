"""The lab demo: a 3-node repmgr cluster, a client writing through the VIP, failover, switchover."""
