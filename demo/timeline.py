"""Records what happened during a lab run: VIP holders, roles, client writes, our actions.

Used by the demo and the benchmark: a background sampler notes every change with a wall-clock
time, the client writer's JSON lines are merged in, and the result prints as a timeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab import VIP_IP, Lab

WRITER = Path(__file__).with_name("writer.py")


@dataclass
class Entry:
    t: float
    kind: str  # vip | role | action | client
    text: str


@dataclass
class Timeline:
    lab: Lab
    interval: float = 0.05
    entries: list[Entry] = field(default_factory=list)
    vip_samples: list[tuple[float, list[str]]] = field(default_factory=list)
    start: float = field(default_factory=time.time)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _writer: subprocess.Popen[str] | None = None
    writes: list[dict[str, object]] = field(default_factory=list)
    writer_interval: float = 0.05  # the client's pause between writes
    role_interval: float | None = None  # psql per node per round: the bench samples less often

    def note(self, kind: str, text: str, t: float | None = None) -> None:
        self.entries.append(Entry(time.time() if t is None else t, kind, text))

    def action(self, text: str) -> None:
        self.note("action", text)
        print(f"  {time.time() - self.start:8.3f}  >> {text}", flush=True)

    def _sample_vip(self) -> None:
        last: list[str] | None = None
        while not self._stop.is_set():
            holders = self.lab.vip_holders()
            now = time.time()
            self.vip_samples.append((now, holders))
            if holders != last:
                self.note("vip", "VIP on " + (", ".join(holders) or "no node"), now)
                last = holders
            time.sleep(self.interval)

    def _sample_roles(self) -> None:
        last: dict[str, str] = {}
        while not self._stop.is_set():
            for node in self.lab.nodes:
                state = self.lab.is_in_recovery(node)
                role = {True: "standby", False: "primary", None: "down"}[state]
                if last.get(node.name) != role:
                    self.note("role", f"{node.name} is {role}")
                    last[node.name] = role
            time.sleep(self.interval if self.role_interval is None else self.role_interval)

    def _read_writer(self) -> None:
        assert self._writer is not None and self._writer.stdout is not None
        was_ok: bool | None = None
        for line in self._writer.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.writes.append(record)
            ok = bool(record["ok"])
            if ok != was_ok:
                text = (f"client writes OK via {record.get('server')}" if ok else
                        f"client writes FAIL ({str(record.get('error', ''))[:60]})")
                self.note("client", text, float(str(record["t"])))
                was_ok = ok

    def __enter__(self) -> Timeline:
        self._writer = self.lab.popen(
            None, [sys.executable, str(WRITER), "--host", VIP_IP, "--seconds", "3600",
                   "--interval", str(self.writer_interval)],
            user="postgres", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for target in (self._sample_vip, self._sample_roles, self._read_writer):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.terminate()
            self._writer.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)

    @property
    def max_holders(self) -> int:
        return max((len(h) for _, h in self.vip_samples), default=0)

    def first(self, kind: str, text: str, after: float) -> float | None:
        for entry in sorted(self.entries, key=lambda e: e.t):
            if entry.t >= after and entry.kind == kind and text in entry.text:
                return entry.t
        return None

    def outage_after(self, after: float) -> tuple[float, float] | None:
        """The first run of failed writes at or after `after`: (first failure, first success)."""
        failed_at: float | None = None
        for record in self.writes:
            t = float(str(record["t"]))
            if t < after:
                continue
            if not record["ok"] and failed_at is None:
                failed_at = t
            elif record["ok"] and failed_at is not None:
                return failed_at, t
        return None

    def render(self) -> str:
        lines = ["      t(s)  what"]
        for entry in sorted(self.entries, key=lambda e: e.t):
            marker = ">>" if entry.kind == "action" else "  "
            lines.append(f"  {entry.t - self.start:8.3f}  {marker} {entry.text}")
        return "\n".join(lines)
