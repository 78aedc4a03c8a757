"""Checkpoints as points in (task, retention) space: Pareto frontier, overshoot, rewind policies.

Pure functions over `Point`s; no torch at import, so `sftlab frontier` starts fast and the logic is
tested on hand-made points. Both axes are oriented so that HIGHER IS BETTER: a loss, perplexity or
KL-to-base is negated on the way in (`orient`, `point_from_scores`), and its confidence interval is
flipped with it. The original units are kept in `Point.meta` for display only.

Dominance rules (two of them, for two questions):

- `dominates(a, b, tol)`, used for the frontier: a is >= b on both axes and better by more than `tol`
  on at least one. Exact duplicates therefore never dominate each other and are both on the frontier.
- `dominates_significantly(a, b, tol)`, used for overshoot: a is not worse on either axis beyond the
  tolerance (a.v >= b.v - tol) and significantly better on at least one, where "significantly better"
  means both a.v - b.v > tol AND the confidence intervals do not overlap (a.ci_low > b.ci_high). A point
  without a CI has the zero-width interval (v, v), so without CIs the rule falls back to the tolerance.

The trade-off this file acts on: fine-tuning learns the task while forgetting pretrained ability, and
the last checkpoint often sits past the best trade-off (Biderman et al. 2024, "LoRA Learns Less and
Forgets Less").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .errors import SftlabError
from .registry import Registry

AXES = ("task", "retention")


@dataclass(frozen=True)
class Point:
    """One scored model: a checkpoint (alpha None) or an interpolation base -> checkpoint at `alpha`."""

    step: int
    task: float  # oriented: higher is better
    retention: float  # oriented: higher is better (e.g. -KL to the base)
    task_ci: tuple[float, float] | None = None  # (low, high) in the oriented units
    retention_ci: tuple[float, float] | None = None
    alpha: float | None = None  # None: the checkpoint itself (same as alpha 1)
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def value(self, axis: str) -> float:
        return getattr(self, axis)

    def ci(self, axis: str) -> tuple[float, float]:
        ci = getattr(self, f"{axis}_ci")
        v = self.value(axis)
        return (v, v) if ci is None else (float(ci[0]), float(ci[1]))

    @property
    def progress(self) -> tuple[int, float]:
        """Order along the run: by step, then by alpha (a checkpoint counts as alpha 1)."""
        return (self.step, 1.0 if self.alpha is None else float(self.alpha))

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.alpha is None else f"step {self.step} at alpha {self.alpha:g}"


# ---- orientation ----------------------------------------------------------------------------------

def orient(value: float, higher_is_better: bool) -> float:
    """A metric value on the 'higher is better' scale (a loss or KL is negated)."""
    return float(value) if higher_is_better else -float(value)


def orient_ci(ci: tuple[float, float] | None, higher_is_better: bool) -> tuple[float, float] | None:
    """A (low, high) interval on the oriented scale: negation swaps the bounds."""
    if ci is None:
        return None
    lo, hi = float(ci[0]), float(ci[1])
    return (lo, hi) if higher_is_better else (-hi, -lo)


def _get(score: Any, key: str, default=None):
    if isinstance(score, Mapping):
        return score.get(key, default)
    return getattr(score, key, default)


def oriented_score(score: Any) -> tuple[float, tuple[float, float] | None, bool]:
    """(value, ci, higher_is_better) of a Score-like dict or object {value, higher_is_better, ci_low, ci_high}."""
    hib = bool(_get(score, "higher_is_better", True))
    lo, hi = _get(score, "ci_low"), _get(score, "ci_high")
    ci = None if lo is None or hi is None else (lo, hi)
    return orient(_get(score, "value"), hib), orient_ci(ci, hib), hib


def point_from_scores(step: int, task: Any, retention: Any, alpha: float | None = None,
                      meta: dict | None = None) -> Point:
    """A Point from two Score-like values; their orientation is recorded in meta for display."""
    t, t_ci, t_hib = oriented_score(task)
    r, r_ci, r_hib = oriented_score(retention)
    m = {"task_higher_is_better": t_hib, "retention_higher_is_better": r_hib,
         "task_name": _get(task, "name", "task"), "retention_name": _get(retention, "name", "retention"),
         **(meta or {})}
    return Point(step, t, r, t_ci, r_ci, alpha, m)


def shown(p: Point, axis: str) -> str:
    """An axis value in its original units, e.g. 'retention (kl) 0.120, lower is better'."""
    hib = p.meta.get(f"{axis}_higher_is_better", True)
    name = p.meta.get(f"{axis}_name", axis)
    text = f"{name} {orient(p.value(axis), hib):.4g}"
    return text if hib else f"{text} (lower is better)"


# ---- dominance and the frontier ---------------------------------------------------------------------

def dominates(a: Point, b: Point, tol: float = 0.0) -> bool:
    """a >= b on both axes and better by more than tol on at least one (duplicates never dominate)."""
    if any(a.value(x) < b.value(x) for x in AXES):
        return False
    return any(a.value(x) - b.value(x) > tol for x in AXES)


def beats_significantly(a: Point, b: Point, axis: str, tol: float = 0.0) -> bool:
    """a is better than b on `axis` by more than tol and their confidence intervals do not overlap."""
    return a.value(axis) - b.value(axis) > tol and a.ci(axis)[0] > b.ci(axis)[1]


def dominates_significantly(a: Point, b: Point, tol: float = 0.0) -> bool:
    """Not worse than b beyond tol on either axis, and significantly better (see above) on one."""
    if any(a.value(x) < b.value(x) - tol for x in AXES):
        return False
    return any(beats_significantly(a, b, x, tol) for x in AXES)


def pareto_front(points: Iterable[Point], tol: float = 0.0) -> list[Point]:
    """The points no other point dominates, in run order. Exact duplicates are all kept."""
    pts = list(points)
    front = [p for p in pts if not any(dominates(q, p, tol) for q in pts if q is not p)]
    return sorted(front, key=lambda p: p.progress)


def final_point(points: Iterable[Point]) -> Point:
    pts = list(points)
    if not pts:
        raise SftlabError("no scored points; score the run first (sftlab eval RUN)")
    return max(pts, key=lambda p: p.progress)


def overshoot(points: Iterable[Point], tol: float = 0.0) -> list[Point]:
    """Earlier points that significantly dominate the final one (empty: no overshoot), in run order."""
    pts = list(points)
    last = final_point(pts)
    found = [p for p in pts if p.progress < last.progress and dominates_significantly(p, last, tol)]
    return sorted(found, key=lambda p: p.progress)


# ---- normalisation and geometry -------------------------------------------------------------------

def normaliser(points: Iterable[Point]) -> Callable[[Point], tuple[float, float]]:
    """Min-max scaling of both axes over `points` to [0, 1] (an axis with no spread maps to 0)."""
    pts = list(points)
    lo = {x: min(p.value(x) for p in pts) for x in AXES}
    span = {x: max(p.value(x) for p in pts) - lo[x] for x in AXES}

    def scale(p: Point) -> tuple[float, float]:
        return tuple((p.value(x) - lo[x]) / span[x] if span[x] > 0 else 0.0 for x in AXES)  # type: ignore

    return scale


def hypervolume_2d(points: Iterable[Point], ref: tuple[float, float],
                   ideal: tuple[float, float] | None = None) -> float:
    """Area dominated by the points and bounded below by `ref` = (task, retention), oriented units.

    With `ideal` the axes are first rescaled so that ref -> 0 and ideal -> 1, making the result the
    normalised share of the ref..ideal box (comparable across runs scored against the same pair).
    Points not strictly above ref on both axes add nothing.
    """
    if ideal is not None:
        spans = [ideal[i] - ref[i] for i in range(2)]
        if min(spans) <= 0:
            raise SftlabError(f"hypervolume: ideal {ideal} must exceed ref {ref} on both axes")
    else:
        spans = [1.0, 1.0]
    xy = [((p.task - ref[0]) / spans[0], (p.retention - ref[1]) / spans[1]) for p in points]
    xy = sorted((x, y) for x, y in xy if x > 0 and y > 0)
    area, best_y = 0.0, 0.0
    for i in range(len(xy) - 1, -1, -1):  # sweep from the highest task down
        x, y = xy[i]
        if y > best_y:
            area += x * (y - best_y)  # the strip of retention that this point adds
            best_y = y
    return area


# ---- rewind policies ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    point: Point
    reason: str  # one or two sentences with the numbers behind the choice


@dataclass(frozen=True)
class Policy:
    name: str
    choose: Callable[..., Choice]  # (points, **params) -> Choice
    description: str
    params: tuple[str, ...] = ()


POLICIES: Registry[Policy] = Registry("rewind policy")


def register_policy(policy: Policy) -> Policy:
    return POLICIES.register(policy.name, policy)


def rewind(points: Iterable[Point], policy: str, **params) -> Choice:
    """Choose a point with the named policy; params are that policy's knobs (see POLICIES)."""
    pts = list(points)
    if not pts:
        raise SftlabError("no scored points to choose from; score the run first (sftlab eval RUN)")
    pol = POLICIES.get(policy)
    unknown = sorted(set(params) - set(pol.params))
    if unknown:
        raise SftlabError(f"rewind policy {policy!r}: unknown option {unknown[0]!r}; it takes {list(pol.params)}")
    return pol.choose(pts, **params)


def base_point(points: Iterable[Point]) -> Point:
    """The reference for 'retention loss': step 0 (or alpha 0), else refuse."""
    pts = [p for p in points if p.step == 0 or p.alpha == 0]
    if not pts:
        raise SftlabError("this policy compares against the base model, but no point has step 0 (or alpha 0); "
                          "score the base too")
    return min(pts, key=lambda p: p.progress)


def _earliest_best(points: list[Point], key: Callable[[Point], float]) -> Point:
    """The point maximising key; ties go to the earliest (less training is the cheaper answer)."""
    best = max(key(p) for p in points)
    return min((p for p in points if key(p) == best), key=lambda p: p.progress)


def _coords(p: Point) -> str:
    return f"{shown(p, 'task')}, {shown(p, 'retention')}"


def origin(points: list[Point]) -> Point | None:
    """The base (step 0, or alpha 0): the origin of the plane, never a candidate; None when unscored."""
    pts = [p for p in points if p.step == 0 or p.alpha == 0]
    return min(pts, key=lambda p: p.progress) if pts else None


def above_base(points: list[Point]) -> tuple[Point | None, list[Point]]:
    """(the base, the trained points whose task score is above the base's 95% CI, or above its value when it
    has none): what a selection rule may recommend."""
    base = origin(points)
    trained = [p for p in points if not (p.step == 0 or p.alpha == 0)]
    if base is None:
        return None, trained
    return base, [p for p in trained if p.task > base.ci("task")[1]]


def _keep_base(base: Point, rule: str, why: str) -> Choice:
    return Choice(base, f"{rule}: {why}, so the base ({_coords(base)}) is kept: the fine-tuning did not pay off "
                        "under this rule.")


KNEE_RULE = "knee of the checkpoints whose task score is above the base's 95% CI (the default rule)"


def knee(points: list[Point]) -> Choice:
    """The default rule: among the checkpoints whose task score beats the base's CI, the frontier point farthest
    (towards the ideal corner) from the chord between its extremes, both axes min-max scaled over all points.
    The base is the origin of the plane, not a candidate; it is returned only when no checkpoint beats it."""
    base, cands = above_base(points)
    if not cands:
        if base is None:
            raise SftlabError("no trained checkpoint is scored; score the run first (sftlab eval RUN)")
        return _keep_base(base, KNEE_RULE, "no checkpoint's task score is above the base's 95% CI")
    front = pareto_front(cands)
    scale = normaliser(points)
    if len(front) == 1:
        p = front[0]
        return Choice(p, f"{KNEE_RULE}: {p.label} ({_coords(p)}) is the only Pareto-optimal one of the "
                         f"{len(cands)} candidates.")
    a = scale(max(front, key=lambda q: (q.task, q.retention)))  # the best-task end
    b = scale(max(front, key=lambda q: (q.retention, q.task)))  # the best-retention end
    length = math.hypot(b[0] - a[0], b[1] - a[1])

    def bulge(p: Point) -> float:  # signed distance to the chord, positive on the side of (1, 1)
        x, y = scale(p)
        cross = (b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0])
        return -cross / length if length > 0 else 0.0

    # Ties (every point on the chord, as on a two-point frontier): the point nearer the ideal corner, then the
    # better task score.
    p = _earliest_best(front, lambda q: (round(bulge(q), 12), round(sum(scale(q)), 12), q.task))  # type: ignore
    if bulge(p) <= 1e-12:
        return Choice(p, f"{KNEE_RULE}: {p.label} ({_coords(p)}); none of the {len(front)} Pareto-optimal "
                         "candidates lies beyond the line joining the best-task and best-retention ends, so there "
                         "is no knee; this is the one nearest the ideal corner after min-max scaling (ties: the "
                         "better task score).")
    return Choice(p, f"{KNEE_RULE}: {p.label} ({_coords(p)}) is the knee: of the {len(front)} Pareto-optimal "
                     f"candidates it lies farthest from the line joining the best-task and best-retention ends "
                     f"(distance {bulge(p):.3f} after min-max scaling over {len(points)} points).")


def max_task_with_retention_loss(points: list[Point], max_loss: float = 0.0) -> Choice:
    """`select: {max_kl: x}`: the best task score among checkpoints whose retention dropped at most max_loss
    below the base (for KL: at most x nats/token) and whose task score is above the base's CI."""
    base = base_point(points)
    rule = f"best task score within a retention loss of {max_loss:g}"
    _, cands = above_base(points)
    ok = [p for p in cands if base.retention - p.retention <= max_loss]
    if not ok:
        return _keep_base(base, rule, f"none of the {len(cands)} checkpoints above the base's task CI lost at "
                                      f"most {max_loss:g} retention")
    p = _earliest_best(ok, lambda q: q.task)
    drop = base.retention - p.retention
    return Choice(p, f"{rule}: {p.label} ({_coords(p)}) has the best task score of the {len(ok)} of "
                     f"{len(points)} points above the base's task CI whose retention fell at most {max_loss:g} below "
                     f"the base's ({shown(base, 'retention')}); its drop is {drop:.4g}.")


def max_retention_with_task(points: list[Point], min_task: float) -> Choice:
    """`select: {min_task: y}`: the least forgetting among checkpoints whose task score reaches min_task (in
    the task metric's own units: for a lower-is-better metric such as a loss it is a ceiling)."""
    hib = points[0].meta.get("task_higher_is_better", True)
    floor = orient(min_task, hib)
    word = "at least" if hib else "at most"
    rule = f"least forgetting with a task score {word} {min_task:g}"
    base = origin(points)
    ok = [p for p in points if p.task >= floor and p is not base]
    if not ok:
        best = max(points, key=lambda q: q.task)
        if base is not None:
            return _keep_base(base, rule, f"no checkpoint reaches it (the best is {best.label} with "
                                          f"{shown(best, 'task')})")
        raise SftlabError(f"no point has task score {word} {min_task:g}; the best is {best.label} with "
                          f"{shown(best, 'task')}: lower the requirement")
    p = _earliest_best(ok, lambda q: q.retention)
    return Choice(p, f"{rule}: {p.label} ({_coords(p)}) keeps the most retention of the {len(ok)} of "
                     f"{len(points)} points whose task score is {word} {min_task:g}.")


def select(points: list[Point], max_kl: float | None = None, min_task: float | None = None,
           max_loss: float | None = None) -> Choice:
    """A selection rule the user states: {max_kl: x} (or max_loss), {min_task: y}, or {} for the default knee."""
    limit = max_kl if max_kl is not None else max_loss
    if limit is not None and min_task is not None:
        raise SftlabError("select: give max_kl (best task within a retention budget) or min_task (least "
                          "forgetting above a task score), not both")
    if limit is not None:
        return max_task_with_retention_loss(points, limit)
    if min_task is not None:
        return max_retention_with_task(points, min_task)
    return knee(points)


SELECT_KEYS = ("max_kl", "min_task")


def select_params(rule: Mapping | None) -> dict:
    """The knobs of policy 'select' from a config's `select:` section (unset keys dropped)."""
    return {k: float(v) for k, v in (rule or {}).items() if k in SELECT_KEYS and v is not None}


def rule_text(rule: Mapping | None) -> str:
    """The stated rule as a reader sees it next to the chosen point, e.g. 'select: {max_kl: 0.1}'."""
    params = select_params(rule)
    if not params:
        return "select: default (the knee among checkpoints above the base's task CI)"
    return "select: {" + ", ".join(f"{k}: {v:g}" for k, v in params.items()) + "}"


def is_base(p: Point) -> bool:
    """The untrained start (step 0, or alpha 0): the plane's origin."""
    return p.step == 0 or p.alpha == 0


def best_rewound(points: list[Point]) -> Choice:
    """The trained checkpoint with the best task score (ties: the earliest): the most that rewinding to one
    checkpoint can give on the task, whatever it cost in retention; the base only when nothing was trained."""
    trained = [p for p in points if not is_base(p)] or list(points)
    if not trained:
        raise SftlabError("no scored points; score the run first (sftlab eval RUN)")
    p = _earliest_best(trained, lambda q: q.task)
    return Choice(p, f"best task score along the path: {p.label} ({_coords(p)})")


def weighted(points: list[Point], w: float = 0.5) -> Choice:
    """Maximise w * task + (1 - w) * retention after min-max scaling both over all points."""
    if not 0.0 <= w <= 1.0:
        raise SftlabError(f"rewind policy 'weighted': w must be in [0, 1], got {w}")
    scale = normaliser(points)

    def score(p: Point) -> float:
        t, r = scale(p)
        return w * t + (1 - w) * r

    p = _earliest_best(points, score)
    t, r = scale(p)
    return Choice(p, f"{p.label} ({_coords(p)}) has the highest weighted score {score(p):.3f} = {w:g} x task "
                     f"{t:.3f} + {1 - w:g} x retention {r:.3f} (both min-max scaled over {len(points)} points).")


register_policy(Policy("knee", knee, "the knee of the Pareto frontier (largest bulge towards the ideal corner)"))
register_policy(Policy("max_task_with_retention_loss", max_task_with_retention_loss,
                       "best task score whose retention dropped at most max_loss below the base", ("max_loss",)))
register_policy(Policy("max_retention_with_task", max_retention_with_task,
                       "best retention whose task score reaches min_task", ("min_task",)))
register_policy(Policy("select", select, "a stated rule: max_kl (or max_loss), min_task, or neither for the "
                       "default knee; never the base unless no checkpoint beats it", ("max_kl", "min_task", "max_loss")))
register_policy(Policy("weighted", weighted, "max of w x task + (1 - w) x retention, min-max scaled", ("w",)))
