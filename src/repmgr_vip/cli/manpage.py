"""repmgr-vip(8) in roff, written from the argparse parser itself so the page never drifts.

The Debian package runs `python3 -m repmgr_vip.cli.manpage > repmgr-vip.8` at build time; every
subcommand, option and help text comes from `cli.build_parser()`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from repmgr_vip import __version__
from repmgr_vip.cli.main import EXIT_CODES, build_parser

FILES = [
    ("/etc/repmgr-vip.toml", "the configuration (TOML); `-c` or $REPMGR_VIP_CONFIG choose "
     "another"),
    ("/usr/share/doc/repmgr-vip/examples/repmgr-vip.toml", "an annotated example"),
    ("/lib/systemd/system/repmgr-vip.service", "the daemon's unit, installed but not enabled"),
    ("STATE_DIR/repmgr-vip.log", "the hooks' log (STATE_DIR defaults to the parent of "
     "repmgr's data_directory)"),
]

SIGNALS = [
    ("SIGTERM, SIGINT", "the daemon stops; the VIP stays unless daemon.on_stop = \"release\""),
    ("SIGHUP", "the daemon re-reads its configuration at the top of its next cycle; an "
     "invalid file is refused with one log line and the running configuration kept "
     "(systemctl reload repmgr-vip)"),
]

ENVIRONMENT = [
    ("REPMGR_VIP_CONFIG", "the configuration file when -c is not given"),
    ("JOURNAL_STREAM", "set by systemd: when stderr is the journal, log lines carry syslog "
     "priorities and no timestamps of their own"),
    ("NOTIFY_SOCKET", "set by systemd for Type=notify: the daemon reports readiness and its "
     "last decision"),
]


def roff(text: str) -> str:
    """Escapes text for roff: backslashes, hyphens, and control characters at line start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    expanded: str = parser._get_formatter()._expand_help(action)
    return expanded


def _action_term(action: argparse.Action) -> str:
    if not action.option_strings:
        return _italic(str(action.metavar or action.dest))
    names = ", ".join(_bold(opt) for opt in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"{names} {_italic(metavar)}"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        out += [".TP", _action_term(action), roff(_help(parser, action))]
    return out


def _subcommands(parser: argparse.ArgumentParser
                 ) -> list[tuple[str, str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._get_subactions()}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
    return found


def _usage(sub: argparse.ArgumentParser) -> str:
    """One line whatever the terminal's width, so the page does not depend on the build host."""
    formatter = argparse.HelpFormatter(sub.prog, width=10_000)
    formatter.add_usage(sub.usage, sub._actions, sub._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _table(rows: list[tuple[str, str]]) -> list[str]:
    out = []
    for term, text in rows:
        out += [".TP", _bold(term), roff(text)]
    return out


def render(parser: argparse.ArgumentParser | None = None, *, epoch: float | None = None) -> str:
    """The whole page; SOURCE_DATE_EPOCH (set by dpkg) makes the date reproducible."""
    parser = parser or build_parser()
    if epoch is None:
        epoch = float(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    lines = [
        f'.TH REPMGR\\-VIP 8 "{date}" "repmgr\\-vip {__version__}" "System Administration"',
        ".SH NAME",
        f"repmgr\\-vip \\- {roff(parser.description or '')}",
        ".SH SYNOPSIS",
        f"{_bold('repmgr-vip')} [{_bold('-c')} {_italic('FILE')}] {_italic('COMMAND')} "
        f"[{_italic('options')}]",
        ".br",
        f"{_bold('repmgr-vip')} {_bold('--version')}",
        ".SH DESCRIPTION",
        roff("repmgr-vip keeps one virtual IP (VIP) on the primary of a PostgreSQL cluster "
             "managed by repmgr, moves it on failover and switchover, and never lets it stand "
             "on two nodes: it is fenced off every other node before it is added on the new "
             "primary and announced with gratuitous ARP. repmgr calls its hooks "
             "(see repmgr-conf); the daemon reconciles continuously on every node."),
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for name, text, sub in _subcommands(parser):
        lines += [f'.SS "{roff(name)}"', roff(text), ".PP", ".nf", roff(_usage(sub)), ".fi"]
        options = _options(sub)
        if options:
            lines += [".RS", *options, ".RE"]
    codes = [line.strip().split(None, 1) for line in EXIT_CODES.splitlines()[1:] if line.strip()]
    lines += [".SH EXIT STATUS", *_table([(c[0], c[1]) for c in codes if len(c) == 2])]
    lines += [".SH SIGNALS", *_table(SIGNALS)]
    lines += [".SH ENVIRONMENT", *_table(ENVIRONMENT)]
    lines += [".SH FILES", *_table(FILES)]
    lines += [".SH SEE ALSO", "\\fBsudoers\\fR(5), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1); "
              "repmgr's documentation (repmgr.conf, repmgrd)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
