"""Exit codes and the exceptions that carry them to the command line.

Every failure the user can act on is raised as a VipError whose message is one line naming
the problem and the fix; the CLI prints it and exits with the error's code.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # an operation was attempted and did not succeed
    USAGE = 2  # bad command line or configuration; nothing on the host was changed
    REFUSED = 3  # refused for safety, e.g. the VIP answers from another host


class VipError(Exception):
    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(VipError):
    exit_code = ExitCode.USAGE


class RefusedError(VipError):
    exit_code = ExitCode.REFUSED


class CommandFailed(VipError):
    """A helper program (ip, arping, ssh, repmgr) returned an unexpected status."""

    exit_code = ExitCode.FAILED
