"""Allows `python -m repmgr_vip`."""

from repmgr_vip.cli.main import main

raise SystemExit(main())
