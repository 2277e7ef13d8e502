"""The lab's own guarantees, without root: its prerequisites install with `make setup`, and its
VIP sampler fails when it could not look (errors, no samples, gaps) instead of passing."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from lab import VipSampler
from lab import prereq as lablib

MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"


def _makefile_debs() -> set[str]:
    text = MAKEFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^DEBS\s*:?=(.*)$", text, re.MULTILINE)
    assert match, "no DEBS line in the Makefile"
    return set(match.group(1).split())


def test_every_lab_program_comes_from_a_package_make_setup_installs() -> None:
    debs = _makefile_debs()
    wanted = {package for _, package in lablib.PREREQUISITES} | {lablib.REPMGR_EXTENSION[1]}
    assert wanted - debs == set(), f"add to DEBS: {sorted(wanted - debs)}"
    paths = [path for path, _ in lablib.PREREQUISITES]
    for program in ("ping", "arping", "setpriv", "ip", "sshd", "ssh", "ssh-keygen", "runuser",
                    "visudo", "usermod", "sudo", "mount", "umount", "psql", "repmgrd"):
        assert any(Path(p).name == program for p in paths), f"{program} not in PREREQUISITES"


def test_a_missing_program_is_named_with_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_access = lablib.os.access
    monkeypatch.setattr(lablib.os, "access",
                        lambda path, mode: path != lablib.PING and real_access(path, mode))
    missing = lablib.missing_prerequisites()
    assert f"missing {lablib.PING}: apt-get install iputils-ping" in missing


class FakeLab:
    """Answers vip_holders() from a script: a tuple of holders, an exception, or a pause."""

    def __init__(self, script: list[object]) -> None:
        self.script = script
        self.calls = 0
        self.lock = threading.Lock()

    def vip_holders(self, ip: str) -> list[str]:
        with self.lock:
            step = self.script[min(self.calls, len(self.script) - 1)]
            self.calls += 1
        if isinstance(step, Exception):
            raise step
        if isinstance(step, float):
            time.sleep(step)
            return ["node1"]
        assert isinstance(step, list)
        return step


def _run(script: list[object], seconds: float = 0.6) -> VipSampler:
    sampler = VipSampler(FakeLab(script))
    with sampler:
        time.sleep(seconds)
    return sampler


def test_sampler_passes_on_good_samples() -> None:
    sampler = _run([["node1"]])
    sampler.assert_never_two()
    assert sampler.period_stats()["count"] >= 5


def test_sampler_fails_on_zero_samples() -> None:
    sampler = VipSampler(FakeLab([["node1"]]))
    with pytest.raises(AssertionError):
        sampler.assert_never_two()


def test_sampler_fails_on_a_sampling_error() -> None:
    sampler = _run([["node1"], ["node1"], OSError("netns gone"), ["node1"]])
    with pytest.raises(AssertionError):
        sampler.assert_never_two()


def test_sampler_fails_on_a_gap_over_200_ms() -> None:
    sampler = _run([["node1"], ["node1"], 0.3, ["node1"]], seconds=0.8)
    with pytest.raises(AssertionError):
        sampler.assert_never_two()


def test_sampler_fails_on_two_holders() -> None:
    sampler = _run([["node1"], ["node1", "node2"], ["node1"]])
    with pytest.raises(AssertionError):
        sampler.assert_never_two()
