"""`make bench`: timings of repmgr-vip in the namespace lab, measured from real sources.

Every figure comes from something that happened in the run: the hooks' own log lines, process
start times from /proc, ARP frames seen in the client namespace, the client writer's attempts.
"""
