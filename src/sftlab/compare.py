"""`sftlab compare`: how much did a generation score change between two checkpoints, with a paired interval.

    sftlab compare RUN_A:STEP RUN_B@selected [--score quality]   # two points
    sftlab compare PIPELINE                                      # each stage's selected point vs the base and
                                                                 # vs the stage before

A point is `RUN:STEP` (step 0: the run's starting model), `RUN@selected` (what its `select:` rule picks, as in
a pipeline's `from:`; also a plain `RUN`) or `RUN@last`. Both points must have been scored by the same
generation probe (`quality`: `sftlab eval RUN --generation --steps N`, or a pipeline, which scores each stage's
selected checkpoint) on the same prompts: the probe keeps every answer's values in prompt order
(`extra.per_answer`), so the change is the mean of per-prompt differences (B - A) with a 95% percentile
bootstrap over prompts (paired: the prompts' own difficulty cancels). An interval that excludes zero is a
change beyond what resampling the prompts explains; it says nothing about other prompts' distribution or
other seeds. Torch-free: it reads trajectory.jsonl only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import SftlabError
from .probes.base import bootstrap_ci

N_BOOT = 2000


@dataclass(frozen=True)
class PointRef:
    run: Path
    step: int
    label: str


def parse_point(text: str) -> tuple[str, str, int | None]:
    """'RUN:STEP' | 'RUN@selected' | 'RUN@last' | 'RUN' -> (run, how, step)."""
    run, at, how = text.rpartition("@")
    if at and "/" not in how:
        if how not in ("selected", "last"):
            raise SftlabError(f"{text}: after @ write selected or last (or RUN:STEP)")
        return run, how, None
    run, colon, step = text.rpartition(":")
    if colon and "/" not in step:
        if not step.isdigit():
            raise SftlabError(f"{text}: STEP must be a checkpoint's step (0: the run's starting model)")
        return run, "step", int(step)
    return text, "selected", None


def resolve_point(text: str) -> PointRef:
    from .rundir_format import read_trajectory

    run, how, step = parse_point(text)
    folder = Path(run)
    if not (folder / "config.yaml").is_file():
        raise SftlabError(f"{run}: not a run directory (no config.yaml); give RUN:STEP, RUN@selected or RUN@last")
    if how == "last":
        saved = [e["step"] for e in read_trajectory(folder) if e.get("path")]
        if not saved:
            raise SftlabError(f"{run}: no checkpoint yet")
        step = saved[-1]
    elif how == "selected":
        from .pipeline import select_in
        from .runs import Run

        step = select_in(folder, Run(folder).cfg)["step"]
    return PointRef(folder, int(step), f"{folder.name}:{step}")


def score_at(point: PointRef, name: str | None) -> tuple[str, dict]:
    """(score name, score dict) of the generation score with per-answer values at the point."""
    from .rundir_format import read_trajectory

    scores = next((e.get("scores", {}) for e in read_trajectory(point.run) if e["step"] == point.step), {})
    have = {k: s for k, s in scores.items() if isinstance(s, dict) and (s.get("extra") or {}).get("per_answer")}
    if name is not None:
        if name not in have:
            raise SftlabError(f"{point.label}: no {name!r} score with per-answer values at step {point.step}; "
                              f"score it: sftlab eval {point.run} --generation --steps {point.step}")
        return name, have[name]
    if not have:
        raise SftlabError(f"{point.label}: no generation score with per-answer values (a quality probe) at step "
                          f"{point.step}; score it: sftlab eval {point.run} --generation --steps {point.step}")
    first = sorted(have)[0]
    return first, have[first]


def paired_change(a: list, b: list, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Mean of b - a over the prompts both scored, with its percentile-bootstrap 95% interval."""
    d = [y - x for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return {"change": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return {"change": sum(d) / len(d), "ci_low": lo, "ci_high": hi, "n": len(d)}


def mean_ci(values: list, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    v = [x for x in values if x is not None]
    lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    return {"mean": sum(v) / len(v) if v else math.nan, "ci_low": lo, "ci_high": hi, "n": len(v)}


def per_answer(score: dict, label: str) -> tuple[list, dict]:
    pa = score["extra"]["per_answer"]
    return pa["sources"], pa["values"]


def compare_scores(a: dict, b: dict, label_a: str, label_b: str, dims: list[str] | None = None) -> dict:
    """{dimension: {a: mean/CI, b: mean/CI, change: paired change/CI}} for the values both scores hold."""
    src_a, va = per_answer(a, label_a)
    src_b, vb = per_answer(b, label_b)
    if src_a != src_b:
        raise SftlabError(f"{label_a} and {label_b} answered different prompts ({len(src_a)} vs {len(src_b)}, or "
                          "another file or limit); a paired comparison needs the same prompts in the same order")
    names = [d for d in (dims or list(va)) if d in va and d in vb]
    missing = sorted(set(dims or []) - set(names))
    if missing:
        raise SftlabError(f"no {missing[0]!r} values at both points; they have {', '.join(sorted(set(va) & set(vb)))}")
    return {d: {"a": mean_ci(va[d]), "b": mean_ci(vb[d]), "change": paired_change(va[d], vb[d])} for d in names}


def retention_at(point: PointRef) -> dict | None:
    """The first retention score at the point (kl_to_base), as {name, value, ci_low, ci_high}."""
    from .rundir_format import read_trajectory

    scores = next((e.get("scores", {}) for e in read_trajectory(point.run) if e["step"] == point.step), {})
    for name, s in scores.items():
        if isinstance(s, dict) and s.get("kind") == "retention":
            return {"name": name, "value": s.get("value"), "ci_low": s.get("ci_low"), "ci_high": s.get("ci_high")}
    return None


def compare_points(text_a: str, text_b: str, score: str | None = None, dims: list[str] | None = None) -> dict:
    a, b = resolve_point(text_a), resolve_point(text_b)
    name, sa = score_at(a, score)
    _, sb = score_at(b, name)
    return {"score": name, "a": a.label, "b": b.label, "retention": {"a": retention_at(a), "b": retention_at(b)},
            "dimensions": compare_scores(sa, sb, a.label, b.label, dims)}


def pipeline_points(folder: Path) -> list[PointRef]:
    """The base (the first stage's step 0), then each finished stage's selected point, from pipeline.json."""
    state = json.loads((folder / "pipeline.json").read_text(encoding="utf-8"))
    stages = [k for k, v in state.items() if isinstance(v, dict) and "config_hash" in v]
    if not stages:
        raise SftlabError(f"{folder}: no finished stage in pipeline.json yet")
    points = [PointRef(folder / stages[0], 0, "base")]
    for name in stages:
        sel = state[name].get("selected") or {}
        if "step" not in sel:
            raise SftlabError(f"stage {name}: no selected checkpoint recorded (it has no probes); compare two "
                              f"points instead: sftlab compare {folder / name}:STEP ...")
        points.append(PointRef(folder / name, int(sel["step"]), f"{name}:{sel['step']}"))
    return points


def compare_pipeline(folder: str | Path, score: str | None = None, dims: list[str] | None = None) -> dict:
    """Each stage's selected point: its scores, the change from the point before and from the base (paired)."""
    points = pipeline_points(Path(folder))
    name, base = score_at(points[0], score)
    found = [base] + [score_at(p, name)[1] for p in points[1:]]
    rows = []
    for i, (p, s) in enumerate(zip(points, found)):
        row = {"point": p.label, "run": str(p.run), "step": p.step, "retention": retention_at(p)}
        if i:
            row["vs_previous"] = compare_scores(found[i - 1], s, points[i - 1].label, p.label, dims)
            row["vs_base"] = compare_scores(base, s, "base", p.label, dims)
        else:
            row["dimensions"] = {d: mean_ci(v) for d, v in per_answer(s, p.label)[1].items()
                                 if dims is None or d in dims}
        rows.append(row)
    return {"score": name, "prompts": len(per_answer(base, "base")[0]), "points": rows}


def _f(x, digits: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _ci(d: dict, key: str = "mean", sign: bool = False) -> str:
    v = d[key]
    head = (f"{v:+.3g}" if sign and not math.isnan(v) else _f(v))
    star = " *" if sign and not (d["ci_low"] <= 0 <= d["ci_high"]) else ""
    return f"{head} [{_f(d['ci_low'])}, {_f(d['ci_high'])}]{star}"


def _ret(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    return _ci({"mean": r["value"], "ci_low": r.get("ci_low", math.nan) or 0.0, "ci_high": r.get("ci_high") or 0.0})


def format_pipeline(result: dict) -> str:
    pts = result["points"]
    dims = list(pts[1]["vs_base"]) if len(pts) > 1 else list(pts[0]["dimensions"])
    head = ["", *[p["point"] for p in pts]]
    rows = [[(pts[0]["retention"] or {}).get("name", "retention")] + [_ret(p["retention"]) for p in pts]]
    for d in dims:
        rows.append([d] + [_ci(pts[0]["dimensions"][d])] + [_ci(p["vs_base"][d]["b"]) for p in pts[1:]])
        rows.append(["  change vs previous", ""] + [_ci(p["vs_previous"][d]["change"], "change", True)
                                                    for p in pts[1:]])
        rows.append(["  change vs base", ""] + [_ci(p["vs_base"][d]["change"], "change", True) for p in pts[1:]])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    return "\n".join([f"{result['score']}: greedy answers to the same {result['prompts']} prompts at each stage's "
                      "selected checkpoint; mean [95% CI]; changes are paired (per prompt), * = CI excludes 0"]
                     + lines)


def format_points(result: dict) -> str:
    head = ["", result["a"], result["b"], "change (B - A) [95% CI, paired]"]
    ra, rb = result["retention"]["a"], result["retention"]["b"]
    rows = [[(ra or rb or {}).get("name", "retention"), _ret(ra), _ret(rb), ""]]
    for d, c in result["dimensions"].items():
        rows.append([d, _ci(c["a"]), _ci(c["b"]), _ci(c["change"], "change", True)])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    n = next(iter(result["dimensions"].values()))["change"]["n"] if result["dimensions"] else 0
    return "\n".join([f"{result['score']}: {n} prompts answered at both points; * = CI excludes 0"]
                     + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows])


def compare_text(a: str, b: str | None, score: str | None = None, dims: list[str] | None = None,
                 as_json: bool = False) -> str:
    """What `sftlab compare` prints: a pipeline folder's stages (b None), or two points."""
    if b is None:
        if not (Path(a) / "pipeline.json").is_file():
            raise SftlabError(f"{a}: not a pipeline folder (no pipeline.json); give a pipeline folder, or two points: "
                              "sftlab compare RUN_A:STEP RUN_B:STEP")
        result = compare_pipeline(a, score, dims)
        return json.dumps(result, indent=1) if as_json else format_pipeline(result)
    result = compare_points(a, b, score, dims)
    return json.dumps(result, indent=1) if as_json else format_points(result)
