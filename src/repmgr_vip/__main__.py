"""Allows `python -m repmgr_vip`."""

from repmgr_vip.cli import main

raise SystemExit(main())
