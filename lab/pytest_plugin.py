"""pytest fixtures for the namespace lab: `lab` (module-scoped) and `lab_factory`.

Why a plugin: every lab must be torn down whatever happens (failed test,
Ctrl-C, SIGTERM from CI, interpreter exit), and lab tests must skip with a
clear reason on machines that cannot run them, except where the lab is
required (CI=true or RVLAB_REQUIRE=1): there a missing prerequisite fails.

Enable with `pytest_plugins = ["lab.pytest_plugin"]` in tests/conftest.py
or `-p lab.pytest_plugin`. A module can choose its lab's shape with
`pytestmark = pytest.mark.lab_config(nodes=2, witness=True)`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from types import FrameType
from typing import Any

import pytest

from lab import Lab, missing_prerequisites

LAB_FIXTURES = ("lab", "lab_factory")
_LIVE: dict[int, Lab] = {}
_LIVE_LOCK = threading.Lock()
_ITEM_LABS = pytest.StashKey[list[Lab]]()
_PREV_SIGTERM: Any = None


def _register(lab: Lab) -> None:
    """Remember a lab so atexit/SIGTERM can still tear it down."""
    with _LIVE_LOCK:
        _LIVE[id(lab)] = lab


def _teardown(lab: Lab) -> None:
    """down() and forget the lab."""
    try:
        lab.down()
    finally:
        with _LIVE_LOCK:
            _LIVE.pop(id(lab), None)


def teardown_all() -> None:
    """Tear down every lab still alive (atexit, SIGTERM)."""
    with _LIVE_LOCK:
        labs = list(_LIVE.values())
    for lab in reversed(labs):
        with contextlib.suppress(Exception):
            _teardown(lab)


atexit.register(teardown_all)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Clean up, then behave as the previous SIGTERM handler would."""
    teardown_all()
    prev = _PREV_SIGTERM
    if callable(prev):
        prev(signum, frame)
        return
    if prev == signal.SIG_IGN:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def lab_required() -> bool:
    """Must lab tests run here (fail rather than skip)?"""
    return os.environ.get("RVLAB_REQUIRE") == "1" or os.environ.get("CI") == "true"


def pytest_configure(config: pytest.Config) -> None:
    """Register markers and the SIGTERM handler."""
    global _PREV_SIGTERM
    config.addinivalue_line("markers", "lab: needs the network-namespace lab (root)")
    config.addinivalue_line(
        "markers", "lab_config(**kwargs): Lab() arguments for the `lab` fixture"
    )
    if threading.current_thread() is threading.main_thread():
        _PREV_SIGTERM = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Last chance teardown and restore SIGTERM."""
    teardown_all()
    if threading.current_thread() is threading.main_thread() and _PREV_SIGTERM is not None:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, _PREV_SIGTERM)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark lab tests; skip them with the reason when this machine cannot run them."""
    missing = missing_prerequisites()
    skip = None
    if missing and not lab_required():
        skip = pytest.mark.skip(reason="namespace lab unavailable: " + "; ".join(missing))
    for item in items:
        names = getattr(item, "fixturenames", ())
        if any(f in names for f in LAB_FIXTURES) or item.get_closest_marker("lab"):
            item.add_marker(pytest.mark.lab)
            if skip is not None:
                item.add_marker(skip)


def _require() -> None:
    """Fail loudly (CI) when the lab cannot run; collection normally skipped already."""
    missing = missing_prerequisites()
    if missing:
        msg = "namespace lab unavailable: " + "; ".join(missing)
        if lab_required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A running 3-node repmgr cluster shared by a test module, always torn down."""
    _require()
    marker = request.node.get_closest_marker("lab_config")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    the_lab = Lab(**kwargs)
    _register(the_lab)
    try:
        the_lab.up()
        yield the_lab
    finally:
        _teardown(the_lab)


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """Build labs with Lab(**kwargs).up(); all are torn down after the test."""
    _require()
    made: list[Lab] = []
    request.node.stash[_ITEM_LABS] = made

    def make(**kwargs: Any) -> Lab:
        new = Lab(**kwargs)
        _register(new)
        made.append(new)
        return new.up()

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for one in reversed(made):
            try:
                _teardown(one)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach node states and log tails of the test's labs to a failure report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    empty: list[Lab] = []
    stashed = item.stash.get(_ITEM_LABS, empty)
    labs = list(stashed)
    funcargs = getattr(item, "funcargs", {})
    if isinstance(funcargs.get("lab"), Lab):
        labs.insert(0, funcargs["lab"])
    for one in labs:
        try:
            text = one.diagnostics()
        except Exception as exc:
            text = f"(diagnostics failed: {exc!r})"
        report.sections.append((f"lab {one.prefix} diagnostics", text))
