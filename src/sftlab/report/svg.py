"""Inline SVG charts drawn in Python: axes with readable ticks, and a line chart. No plotting library and
no JavaScript, so the page renders (and prints) the same everywhere; text goes through `esc`.

Coordinates: data values map linearly into the plot box (or on a symmetric log scale, `symlog_axis`, when
they span orders of magnitude, as KLs do); SVG's y grows downwards, so `Frame.y` flips it.
An axis can be *reversed* (`Axis.flip`): the report places lower-is-better metrics (a loss, a KL) reversed,
so that right and up always mean better and the ideal corner of the task-vs-retention plane is top-right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .escape import esc, finite, fmt

# Tableau 10: distinguishable, and readable for the common colour-vision deficiencies.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")


def colours(names: list[str]) -> dict[str, str]:
    """A stable colour per distinct name, in the order given (cycling past ten)."""
    out: dict[str, str] = {}
    for n in names:
        if n not in out:
            out[n] = PALETTE[len(out) % len(PALETTE)]
    return out


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(max(count, 0))]


def padded(values: list[float], pad: float = 0.06) -> tuple[float, float]:
    """(lo, hi) around the finite values with a margin; a single value gets a unit-scaled window."""
    vals = [v for v in values if finite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    span = hi - lo
    if span <= 0:
        span = abs(lo) * 0.1 or 1.0
        return lo - span / 2, hi + span / 2
    return lo - pad * span, hi + pad * span


@dataclass
class Axis:
    """A plotted quantity. `lo`/`hi` are in plotted units; with `flip` the shown value is minus the plotted
    one (a lower-is-better metric, plotted negated so that larger is better)."""

    label: str
    lo: float
    hi: float
    flip: bool = False
    scale: float = 0.0  # > 0: symmetric log scale, linear within about +-scale of zero (symlog_axis)

    def t(self, v: float) -> float:
        """Where a plotted value sits along the axis: itself, or its symmetric log."""
        return v if not self.scale else math.copysign(math.log10(1 + abs(v) / self.scale), v)

    def ticks(self, n: int = 5) -> list[tuple[float, str]]:
        """(plotted value, label in the metric's own units)."""
        sign = -1.0 if self.flip else 1.0
        lo, hi = sorted((sign * self.lo, sign * self.hi))  # the shown range
        if not self.scale:
            return [(sign * v, fmt(v, 3)) for v in nice_ticks(lo, hi, n)]
        # 0 first, then powers of ten, then their 5s and 2s: each kept unless closer than `gap` to one kept
        cands = [0.0] + [s * m * 10.0 ** k for m in (1, 5, 2) for k in range(8, -9, -1) for s in (1, -1)]
        out: list[float] = []
        gap = (self.t(self.hi) - self.t(self.lo)) / (2.0 * n)
        for v in (c for c in cands if lo <= c <= hi):
            if all(abs(self.t(sign * v) - self.t(sign * u)) >= gap for u in out):
                out.append(v)
        return [(sign * v, fmt(v, 3)) for v in sorted(out)]


def symlog_axis(label: str, values: list[float], flip: bool = False, decades: float = 2.0) -> Axis:
    """An axis over `values` (plotted units), on a symmetric log scale when their nonzero magnitudes span more
    than `decades` powers of ten (a KL of 0.03 next to one of 8: linear, the small ones would be one dot)."""
    mags = sorted(abs(v) for v in values if finite(v) and v != 0)
    if not mags or mags[-1] / mags[0] <= 10 ** decades:
        return Axis(label, *padded(values), flip=flip)
    ax = Axis(f"{label}; log scale", 0.0, 1.0, flip=flip, scale=max(mags[0], mags[-1] * 1e-4))
    lo_t, hi_t = padded([ax.t(v) for v in values if finite(v)])  # the margin in log space

    def inv(y: float) -> float:
        return math.copysign(ax.scale * (10 ** abs(y) - 1), y)

    ax.lo, ax.hi = inv(lo_t), inv(hi_t)
    return ax


@dataclass
class Frame:
    """The plot box inside an SVG of width x height, with room for tick labels and axis titles."""

    xaxis: Axis
    yaxis: Axis
    width: int = 720
    height: int = 440
    left: int = 72
    right: int = 16
    top: int = 16
    bottom: int = 52

    def x(self, v: float) -> float:
        a = self.xaxis
        span = a.t(a.hi) - a.t(a.lo) or 1.0
        return round(self.left + (a.t(v) - a.t(a.lo)) / span * (self.width - self.left - self.right), 2)

    def y(self, v: float) -> float:
        a = self.yaxis
        span = a.t(a.hi) - a.t(a.lo) or 1.0
        return round(self.height - self.bottom - (a.t(v) - a.t(a.lo)) / span
                     * (self.height - self.top - self.bottom), 2)

    def axes_svg(self) -> str:
        """Grid, ticks and axis titles."""
        x0, x1, y0, y1 = self.left, self.width - self.right, self.height - self.bottom, self.top
        parts = [f'<rect class="plotbox" x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}"/>']
        for v, label in self.xaxis.ticks(6):
            px = self.x(v)
            parts.append(f'<line class="grid" x1="{px}" y1="{y1}" x2="{px}" y2="{y0}"/>'
                         f'<text class="tick" x="{px}" y="{y0 + 16}" text-anchor="middle">{esc(label)}</text>')
        for v, label in self.yaxis.ticks(5):
            py = self.y(v)
            parts.append(f'<line class="grid" x1="{x0}" y1="{py}" x2="{x1}" y2="{py}"/>'
                         f'<text class="tick" x="{x0 - 6}" y="{py + 4}" text-anchor="end">{esc(label)}</text>')
        parts.append(f'<text class="axis-title" x="{(x0 + x1) / 2}" y="{self.height - 10}" '
                     f'text-anchor="middle">{esc(self.xaxis.label)}</text>')
        parts.append(f'<text class="axis-title" transform="translate(14 {(y0 + y1) / 2}) rotate(-90)" '
                     f'text-anchor="middle">{esc(self.yaxis.label)}</text>')
        return "".join(parts)


def svg(frame: Frame, body: str, label: str, cls: str = "chart") -> str:
    """The <svg> element: scales with the page width, described for screen readers by `label`."""
    return (f'<svg class="{cls}" viewBox="0 0 {frame.width} {frame.height}" role="img" '
            f'aria-label="{esc(label)}" xmlns="http://www.w3.org/2000/svg">{frame.axes_svg()}{body}</svg>')


def thin(xy: list[tuple[float, float]], limit: int = 1500) -> list[tuple[float, float]]:
    """At most `limit` points, evenly strided, the last one kept (a long run's curve stays light)."""
    if len(xy) <= limit:
        return xy
    stride = math.ceil(len(xy) / limit)
    return xy[::stride] + ([xy[-1]] if (len(xy) - 1) % stride else [])


@dataclass
class Line:
    name: str
    colour: str
    xy: list[tuple[float, float]]
    dashed: bool = False
    markers: bool = False


def line_chart(lines: list[Line], xlabel: str, ylabel: str, label: str) -> str:
    """Several named lines over a shared x axis (steps), legend underneath the plot is the caller's."""
    xs = [x for ln in lines for x, _ in ln.xy]
    ys = [y for ln in lines for _, y in ln.xy if finite(y)]
    fr = Frame(Axis(xlabel, *padded(xs, 0.02)), Axis(ylabel, *padded(ys)))
    body = []
    for ln in lines:
        pts = [(x, y) for x, y in thin(ln.xy) if finite(x) and finite(y)]
        if not pts:
            continue
        coords = " ".join(f"{fr.x(x)},{fr.y(y)}" for x, y in pts)
        dash = ' stroke-dasharray="5 3"' if ln.dashed else ""
        body.append(f'<polyline class="curve" points="{coords}" stroke="{ln.colour}"{dash}>'
                    f'<title>{esc(ln.name)}</title></polyline>')
        if ln.markers:
            body.extend(f'<circle cx="{fr.x(x)}" cy="{fr.y(y)}" r="3" fill="{ln.colour}">'
                        f'<title>{esc(ln.name)}: step {fmt(x)}, {esc(ylabel)} {fmt(y)}</title></circle>'
                        for x, y in pts)
    return svg(fr, "".join(body), label)


def legend(items: list[tuple[str, str]]) -> str:
    """HTML legend: (name, colour) swatches."""
    return '<ul class="legend">' + "".join(
        f'<li><span class="swatch" style="background:{c}"></span>{esc(n)}</li>' for n, c in items) + "</ul>"
