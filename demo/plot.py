"""Draws a Timeline as a PNG that a person reads at a glance.

One row per node, coloured by its role (primary, standby, down), with a gold stripe while it
holds the VIP; one row for the client, green while its writes succeed and red while they fail;
dashed lines for what was done to the cluster. matplotlib is optional: without it the demo and
the benchmark still run and only say that no picture was drawn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from demo.timeline import Timeline

ROLE_COLOURS = {"primary": "#2b6cb0", "standby": "#cbd5e0", "down": "#1a202c"}
VIP_COLOUR = "#f6c343"
OK_COLOUR = "#38a169"
FAIL_COLOUR = "#e53e3e"
MARKER_COLOUR = "#4a5568"
FIG_WIDTH = 13.0
LEVEL_STEP = 0.42
CHAR_INCHES = 0.068  # rough width of one character of 8-point text
ROLE_TEXT = re.compile(r"^(\S+) is (primary|standby|down)$")


@dataclass(frozen=True)
class Span:
    start: float
    end: float
    label: str


def role_spans(timeline: Timeline, end: float) -> dict[str, list[Span]]:
    """Each node's role over time, from the timeline's role changes."""
    changes: dict[str, list[tuple[float, str]]] = {n.name: [] for n in timeline.lab.nodes}
    for entry in sorted(timeline.entries, key=lambda e: e.t):
        match = ROLE_TEXT.match(entry.text) if entry.kind == "role" else None
        if match and match.group(1) in changes:
            changes[match.group(1)].append((entry.t, match.group(2)))
    return {name: _to_spans(points, end) for name, points in changes.items()}


def vip_spans(timeline: Timeline, end: float) -> dict[str, list[Span]]:
    """When each node held the VIP, from the sampler's readings of every node's addresses."""
    spans: dict[str, list[Span]] = {n.name: [] for n in timeline.lab.nodes}
    samples = sorted(timeline.vip_samples, key=lambda s: s[0])
    for i, (t, holders) in enumerate(samples):
        until = samples[i + 1][0] if i + 1 < len(samples) else end
        for name in holders:
            if name not in spans:
                continue
            if spans[name] and spans[name][-1].end == t:  # the same holding, one span
                spans[name][-1] = Span(spans[name][-1].start, until, "VIP")
            else:
                spans[name].append(Span(t, until, "VIP"))
    return spans


def client_spans(timeline: Timeline, end: float) -> list[Span]:
    """The client's state over time: that of its latest write attempt ("ok via NODE"/"fail")."""
    points: list[tuple[float, str]] = []
    for record in sorted(timeline.writes, key=lambda r: float(str(r["t"]))):
        state = f"ok via {record.get('server')}" if record["ok"] else "fail"
        points.append((float(str(record["t"])), state))
    return _to_spans(points, end)


def _to_spans(points: Sequence[tuple[float, str]], end: float) -> list[Span]:
    spans: list[Span] = []
    for i, (t, state) in enumerate(points):
        until = points[i + 1][0] if i + 1 < len(points) else end
        if spans and spans[-1].label == state:
            spans[-1] = Span(spans[-1].start, until, state)
        else:
            spans.append(Span(t, until, state))
    return spans


def _place_labels(items: Sequence[tuple[float, str]], begin: float, end: float
                  ) -> list[tuple[float, str, int, str]]:
    """Stacks marker labels in as few levels as possible without overlapping one another.

    A label sits right of its line, or left of it where it would run off the picture.
    """
    per_char = (end - begin) / (FIG_WIDTH * 0.85) * CHAR_INCHES
    levels: list[list[tuple[float, float]]] = []
    placed = []
    for t, text in items:
        width = len(text) * per_char
        left, right, align = (t, t + width, "left") if t + width <= end else (t - width, t,
                                                                              "right")
        level = next((i for i, used in enumerate(levels)
                      if all(right < a or left > b for a, b in used)), len(levels))
        if level == len(levels):
            levels.append([])
        levels[level].append((left, right))
        placed.append((t, text, level, align))
    return placed


def write_png(
    timeline: Timeline,
    path: Path,
    *,
    title: str = "",
    t0: float | None = None,
    x_label: str = "seconds",
    window: tuple[float, float] | None = None,
    markers: Sequence[tuple[float, str]] = (),
) -> str:
    """Writes the picture; returns the line to print (where it is, or why there is none).

    `t0` is the wall-clock time shown as 0 (default: the timeline's start), `window` limits
    the picture to a wall-clock interval, `markers` adds labelled instants to the actions.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "no PNG drawn: matplotlib is not installed (`pip install matplotlib`)"
    origin = timeline.start if t0 is None else t0
    times = [float(str(w["t"])) for w in timeline.writes] + [t for t, _ in timeline.vip_samples]
    times += [e.t for e in timeline.entries]
    end = min(window[1], max(times)) if window and times else max(times, default=origin + 1)
    begin = max(window[0], min(times)) if window and times else min(times, default=origin)
    actions = [(e.t, e.text) for e in timeline.entries if e.kind == "action"]
    shown = sorted((t, text) for t, text in [*actions, *markers] if begin <= t <= end)

    names = [n.name for n in timeline.lab.nodes]
    rows = len(names) + 1
    labels = _place_labels([(t, f" {t - origin:.2f} s  {text} ") for t, text in shown],
                           begin, end)
    levels = max((level for _, _, level, _ in labels), default=0) + 1
    fig_height = 1.6 + 0.55 * rows + 0.3 * levels
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, fig_height), dpi=110)
    roles, vips = role_spans(timeline, end), vip_spans(timeline, end)

    def rel(t: float) -> float:
        return t - origin

    def bars(spans: Sequence[Span], y: float, height: float, colour: Any, **kw: Any) -> None:
        cut = [(max(s.start, begin), min(s.end, end)) for s in spans]
        ranges = [(rel(a), b - a) for a, b in cut if b > a]
        if ranges:
            ax.broken_barh(ranges, (y - height / 2, height), facecolors=colour, **kw)

    for i, name in enumerate(names):
        y = rows - 1 - i
        for role, colour in ROLE_COLOURS.items():
            bars([s for s in roles[name] if s.label == role], y, 0.8, colour,
                 hatch="//" if role == "down" else None, edgecolor="white", linewidth=0)
        bars(vips[name], y, 0.3, VIP_COLOUR, edgecolor="#7b5e00", linewidth=0.8)
    client = client_spans(timeline, end)
    bars([s for s in client if s.label != "fail"], 0, 0.8, OK_COLOUR)
    bars([s for s in client if s.label == "fail"], 0, 0.8, FAIL_COLOUR)
    for span in client:
        start, stop = max(span.start, begin), min(span.end, end)
        if stop - start < 0.12 * (end - begin):
            continue
        text = ("writes FAIL " + f"{span.end - span.start:.2f} s" if span.label == "fail"
                else "writes " + span.label.replace("ok", "OK"))
        ax.text(rel((start + stop) / 2), 0, text, ha="center", va="center", fontsize=9,
                color="white", fontweight="bold")

    top = rows - 0.5
    for t, text, level, align in labels:
        ax.axvline(rel(t), color=MARKER_COLOUR, linestyle="--", linewidth=0.9)
        ax.text(rel(t), top + 0.3 + LEVEL_STEP * level, text, fontsize=8, va="center",
                ha=align, color="#1a202c",
                bbox={"facecolor": "white", "edgecolor": MARKER_COLOUR, "pad": 1.5,
                      "linewidth": 0.5})
    ax.set_ylim(-0.6, top + 0.3 + LEVEL_STEP * levels)
    ax.set_xlim(rel(begin), rel(end))
    ax.set_yticks([rows - 1 - i for i in range(len(names))] + [0],
                  [*names, "client\nwrites"])
    ax.set_xlabel(x_label)
    ax.grid(axis="x", color="#e2e8f0", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    if title:
        ax.set_title(title, loc="left", fontsize=11)
    legend = [Patch(facecolor=ROLE_COLOURS["primary"], label="primary"),
              Patch(facecolor=ROLE_COLOURS["standby"], label="standby"),
              Patch(facecolor=ROLE_COLOURS["down"], hatch="//", label="PostgreSQL down"),
              Patch(facecolor=VIP_COLOUR, edgecolor="#7b5e00", label="holds the VIP"),
              Patch(facecolor=OK_COLOUR, label="client writes OK"),
              Patch(facecolor=FAIL_COLOUR, label="client writes fail")]
    fig.legend(handles=legend, loc="lower center", ncol=6, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.4 / fig_height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"timeline picture: {path}"
