"""repmgr-vip(8) is generated from the parser: every subcommand and option is on the page."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from repmgr_vip.cli.main import build_parser
from repmgr_vip.cli.manpage import render, roff


def test_every_subcommand_and_option_is_on_the_page() -> None:
    parser = build_parser()
    page = render(parser, epoch=0)
    assert page.startswith('.TH REPMGR\\-VIP 8 "1970-01-01"')
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) > 10
    for name, subparser in sub.choices.items():
        assert f'.SS "{roff(name)}"' in page
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert roff(option) in page, (name, option)


def test_a_new_subcommand_appears_without_editing_the_generator() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    extra = sub.add_parser("frobnicate", help="a command added later")
    extra.add_argument("--widget-count", type=int, help="how many widgets")
    page = render(parser, epoch=0)
    assert '.SS "frobnicate"' in page and "\\-\\-widget\\-count" in page


def test_roff_escapes_control_lines_and_backslashes() -> None:
    assert roff(".start\n'quote\na\\b-c") == "\\&.start\n\\&'quote\na\\eb\\-c"


def test_man_renders_the_page_without_warnings(tmp_path: Path) -> None:
    if shutil.which("man") is None:  # make setup installs man-db; CI must not skip silently
        if os.environ.get("CI") == "true" or os.environ.get("RVLAB_REQUIRE") == "1":
            pytest.fail("man missing: run `make setup` (man-db)")
        pytest.skip("man-db not installed")
    page = tmp_path / "repmgr-vip.8"
    page.write_text(render(epoch=0))
    result = subprocess.run(["man", "--warnings", "-l", "-P", "cat", str(page)],
                            capture_output=True, text=True, check=False,
                            env={"MANWIDTH": "80", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0
    assert result.stderr == "", result.stderr
    assert "repmgr-vip promote" in result.stdout
