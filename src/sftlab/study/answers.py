"""The five questions, answered from a study folder. Pure (no torch): reads JSON and JSONL only.

Every answer is a dict of numbers (with n and 95% intervals across seeds) plus plain sentences built from
them; `findings.py` renders them. Conventions: task scores in their own units (accuracy, ROUGE-L), retention
as the KL to the base (nats/token, lower is better); internally both axes are oriented higher-is-better
(`sftlab.trajectory`). "Kept" trials are the leaderboard's: per (method, seed) the learning rate its rule kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SftlabError
from ..rundir_format import LEADERBOARD
from ..trajectory import Point, dominates_significantly, orient, point_from_scores
from .stats import Estimate, correlation, crossing, mean_ci

# PEFT-Arena's reported correlations of forgetting with activation measures (REFERENCES.md: their Procrustes
# centres both activation matrices, which `procrustes_centred` follows; sftlab's `procrustes_residual` does not).
PAPER = {"procrustes_centred": 0.71, "cka": -0.76}
MEASURES = (("procrustes_centred", "activations", "Procrustes residual, centred (PEFT-Arena's definition)"),
            ("procrustes_residual", "activations", "Procrustes residual, uncentred (sftlab's)"),
            ("cka", "activations", "linear CKA"),
            ("cosine_drift", "activations", "cosine drift"),
            ("rel_update_frob", "weights", "||dW||F / ||W0||F"))
SIMILARITIES = ("cka",)  # higher means less changed
MIN_CORR_N = 8  # fewer analysed checkpoints: "not enough data"


@dataclass
class TrialData:
    name: str
    method: str
    seed: int
    lr: float
    hypervolume: float
    final_dominated: bool
    points: list[Point]
    path: dict | None = None
    analysis: dict = field(default_factory=dict)


@dataclass
class ArenaData:
    name: str
    model: str
    task: str
    kind: str
    score: str
    retention: str
    board: dict
    trials: list[TrialData]

    def methods(self) -> list[str]:
        return list(dict.fromkeys(t.method for t in self.trials))

    def of(self, method: str) -> list[TrialData]:
        return sorted((t for t in self.trials if t.method == method), key=lambda t: t.seed)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_study_data(folder: Path) -> tuple[dict, list[ArenaData]]:
    from ..rewinding import run_points

    meta = _json(folder / "study.json")
    arenas = []
    for e in meta.get("arenas", []):
        af = folder / e["name"]
        board = _json(af / LEADERBOARD)
        trials = []
        for t in board.get("trials", []):
            if not t.get("kept"):
                continue
            d = af / "trials" / t["trial"]
            try:
                points, _, _ = run_points(d, e["score"], e["retention"])
            except SftlabError:
                continue
            trials.append(TrialData(t["trial"], t["method"], t["seed"], t["lr"], t["hypervolume"],
                                    bool(t["final_dominated"]), sorted(points, key=lambda p: p.progress),
                                    _json(af / "paths" / f"{t['trial']}.json") or None,
                                    _json(d / "analysis" / "summary.json")))
        arenas.append(ArenaData(e["name"], e["model"], e["task"], e["kind"], e["score"], e["retention"], board,
                                trials))
    return meta, arenas


# ---- shown units ------------------------------------------------------------------------------------------

def task_of(p: Point) -> float:
    return orient(p.task, p.meta.get("task_higher_is_better", True))


def kl_of(p: Point) -> float:
    return orient(p.retention, p.meta.get("retention_higher_is_better", True))


def _est(values) -> dict:
    e = mean_ci(values)
    return {"mean": e.mean, "low": e.low, "high": e.high, "n": e.n}


def est(d: dict) -> Estimate:
    return Estimate(d["mean"], d["low"], d["high"], d["n"])


def _differ(diff: Estimate, more: str, less: str, same: str) -> str:
    if diff.n < 2:
        return "not enough data (fewer than two paired seeds)"
    if diff.excludes_zero():
        return more if diff.mean > 0 else less
    return same


# ---- (a) forgetting at matched task score -----------------------------------------------------------------

def matched_forgetting(a: ArenaData, ref: str = "full", other: str = "lora") -> dict:
    """KL to the base where each kept trajectory first reaches a common task level: the highest level every
    trial of `ref` and `other` reaches (above the base), crossings interpolated linearly between checkpoints."""
    pair = a.of(ref) + a.of(other)
    if not a.of(ref) or not a.of(other):
        return {"answer": f"not enough data: needs kept trials of both {ref} and {other}", "level": None}
    base = next((p for p in pair[0].points if p.step == 0), pair[0].points[0])
    level = min(max(p.task for p in t.points) for t in pair)
    if level <= base.task:
        return {"answer": f"not enough data: some {ref}/{other} trial never rises above the base's task score, "
                          "so there is no common task score to compare at", "level": None}
    rows, by_seed = {}, {}
    for m in a.methods():
        kls = {}
        for t in a.of(m):
            r = crossing([(p.step, p.task, p.retention) for p in t.points], level)
            if r is not None:
                kls[t.seed] = -r if not t.points[0].meta.get("retention_higher_is_better", True) else r
        by_seed[m] = kls
        rows[m] = {"kl": _est(list(kls.values())), "reached": len(kls), "seeds": len(a.of(m))}
    seeds = sorted(set(by_seed[ref]) & set(by_seed[other]))
    diff = mean_ci([by_seed[ref][s] - by_seed[other][s] for s in seeds])
    shown = orient(level, base.meta.get("task_higher_is_better", True))
    verdict = _differ(diff, f"yes: at this task score {ref} forgets more than {other}",
                      f"no, the opposite: at this task score {ref} forgets less than {other}",
                      f"no clear difference: the interval of {ref} minus {other} spans zero")
    text = (f"At the task score every {ref} and {other} trial reaches ({a.score} {shown:.3g}), the KL to the "
            f"base of {ref} minus {other} is {diff.text('.3g')} nats/token over {diff.n} paired seeds: {verdict}.")
    return {"level": shown, "rows": rows, "diff": {"mean": diff.mean, "low": diff.low, "high": diff.high,
                                                   "n": diff.n}, "answer": text, "verdict": verdict}


# ---- (b) hypervolume ---------------------------------------------------------------------------------------

def frontier_volumes(a: ArenaData, first: str = "oft", second: str = "lora") -> dict:
    rows = {}
    board_rows = {r["method"]: r for r in a.board.get("rows", [])}
    for m in a.methods():
        hv = [t.hypervolume for t in a.of(m)]
        rows[m] = {**_est(hv), "leaderboard": board_rows.get(m, {}).get("hypervolume"),
                   "per_seed": {t.seed: t.hypervolume for t in a.of(m)}}
    if first not in rows or second not in rows:
        return {"rows": rows, "answer": f"not enough data: needs kept trials of both {first} and {second}"}
    seeds = sorted(set(rows[first]["per_seed"]) & set(rows[second]["per_seed"]))
    diff = mean_ci([rows[first]["per_seed"][s] - rows[second]["per_seed"][s] for s in seeds])
    if diff.n < 2:
        verdict = "not enough data (fewer than two paired seeds)"
    elif diff.excludes_zero():
        verdict = f"yes: {first}'s frontier is larger" if diff.mean > 0 else f"no: {first}'s frontier is smaller"
    elif diff.mean >= 0:
        verdict = f"consistent with at least: {first}'s mean is not below {second}'s, and the interval spans zero"
    else:
        verdict = f"not shown: {first}'s mean is below {second}'s, though the interval spans zero"
    text = (f"Hypervolume {first} {est(rows[first]).text('.3f')}, {second} {est(rows[second]).text('.3f')}; "
            f"{first} minus {second} {diff.text('.3f')} over {diff.n} paired seeds: {verdict}.")
    return {"rows": rows, "diff": {"mean": diff.mean, "low": diff.low, "high": diff.high, "n": diff.n},
            "answer": text, "verdict": verdict}


# ---- (c) overshoot and rewinding ----------------------------------------------------------------------------

def path_points(t: TrialData, kind: str | None = None) -> list[Point]:
    """The trial's alpha path as Points (alpha 0 = its step-0 point), in alpha order; [] when it has none."""
    if not t.path or not t.path.get("kinds"):
        return []
    kinds = t.path["kinds"]
    kind = kind or next(iter(kinds))
    if kind not in kinds:
        return []
    task, ret = t.path["task"], t.path["retention"]
    base = next((p for p in t.points if p.step == 0), None)
    pts = [point_from_scores(t.path["step"], e["scores"][task], e["scores"][ret], alpha=e["alpha"])
           for e in kinds[kind] if task in e["scores"] and ret in e["scores"]]
    return ([base] if base is not None else []) + pts


def best_by_weight(points: list[Point], candidates: list[Point], w: float) -> Point:
    """The candidate with the largest w x task + (1 - w) x retention, both min-max scaled over `points`;
    ties: the later one (the larger alpha or step: less rewinding)."""
    ts, rs = [p.task for p in points], [p.retention for p in points]

    def scaled(v, lo, hi):
        return (v - lo) / (hi - lo) if hi > lo else 0.0

    return max(reversed(candidates), key=lambda p: w * scaled(p.task, min(ts), max(ts))
               + (1 - w) * scaled(p.retention, min(rs), max(rs)))


def rewind_gains(a: ArenaData, w: float) -> dict:
    """Per method: final vs best-alpha (PEFT-Arena's rewind table), or vs the best checkpoint where a method
    has no alpha path (prefix/prompt tuning), and how often the final checkpoint is dominated."""
    rows = {}
    for m in a.methods():
        per = []
        for t in a.of(m):
            path = path_points(t)
            if path:
                final = max(path, key=lambda p: p.alpha or 0)
                cands = [p for p in path if p.alpha]
                best = best_by_weight(path, cands, w)
                where = best.alpha
            else:
                final = max(t.points, key=lambda p: p.step)
                cands = [p for p in t.points if p.step > 0]
                if not cands:
                    continue
                best = best_by_weight(t.points, cands, w)
                where = None
            grid_dom = any(dominates_significantly(p, final) for p in path if p.alpha and p.alpha < 1)
            per.append({"seed": t.seed, "alpha": where, "step": best.step, "final_task": task_of(final),
                        "final_kl": kl_of(final), "best_task": task_of(best), "best_kl": kl_of(best),
                        "dominated": t.final_dominated, "grid_dominated": grid_dom if path else None})
        if not per:
            continue
        rows[m] = {"by": "alpha" if per[0]["alpha"] is not None else "checkpoint", "seeds": per,
                   **{k: _est([s[k] for s in per]) for k in ("final_task", "final_kl", "best_task", "best_kl")},
                   "d_task": _est([s["best_task"] - s["final_task"] for s in per]),
                   "d_kl": _est([s["best_kl"] - s["final_kl"] for s in per]),
                   "dominated": sum(s["dominated"] for s in per),
                   "grid_dominated": sum(bool(s["grid_dominated"]) for s in per), "n": len(per)}
    n = sum(r["n"] for r in rows.values())
    dom = sum(r["dominated"] for r in rows.values())
    with_path = [r for r in rows.values() if r["by"] == "alpha"]
    grid = (f" A point of the alpha grid dominates it in {sum(r['grid_dominated'] for r in with_path)} of "
            f"{sum(r['n'] for r in with_path)} trials with a weight path." if with_path else "")
    return {"rows": rows, "n": n, "dominated": dom, "w": w,
            "answer": (f"The final checkpoint is dominated (an earlier checkpoint better beyond its CI on one axis, "
                       f"no worse on the other) in {dom} of {n} kept trials.{grid}"
                       if n else "not enough data: no kept trial")}


# ---- (d) OFT: generator scaling vs dense delta ------------------------------------------------------------

def oft_paths(a: ArenaData, method: str = "oft") -> dict:
    trials = [t for t in a.of(method) if t.path and {"rotation", "additive"} <= set(t.path.get("kinds", {}))]
    if not trials:
        return {"answer": f"not enough data: no {method} trial with both paths", "rows": []}
    alphas = sorted({e["alpha"] for t in trials for e in t.path["kinds"]["rotation"]})
    rows = []
    for al in alphas:
        row = {"alpha": al}
        for kind in ("rotation", "additive"):
            pts = [p for t in trials for p in path_points(t, kind) if p.alpha == al]
            row[kind] = {"task": _est([task_of(p) for p in pts]), "kl": _est([kl_of(p) for p in pts])}
        pairs = [(next(p for p in path_points(t, "additive") if p.alpha == al),
                  next(p for p in path_points(t, "rotation") if p.alpha == al)) for t in trials]
        row["d_kl"] = _est([kl_of(d) - kl_of(r) for d, r in pairs])
        row["d_task"] = _est([task_of(d) - task_of(r) for d, r in pairs])
        rows.append(row)
    inner = [r for r in rows if r["alpha"] < 1]
    parts = []
    for r in inner:
        dk, dt = est(r["d_kl"]), est(r["d_task"])
        parts.append(f"alpha {r['alpha']:g}: dense minus generator KL {dk.text('.3g')}, task {dt.text('.3g')}")
    sig = [r for r in inner if est(r["d_kl"]).excludes_zero()]
    verdict = ("not enough data to test a difference: one seed, no spread across seeds" if len(trials) < 2 else
               "the two paths do not differ beyond the seeds' spread at any inner alpha" if not sig else
               "they differ in KL at alpha " + ", ".join(f"{r['alpha']:g} (dense "
               f"{'more' if r['d_kl']['mean'] > 0 else 'less'})" for r in sig))
    return {"rows": rows, "n": len(trials), "answer": f"Over {len(trials)} {method} trial(s): "
            + "; ".join(parts) + f". At alpha 1 both are the checkpoint. {verdict[0].upper() + verdict[1:]}."}


# ---- (e) geometry vs forgetting -------------------------------------------------------------------------------

def geometry_rows(a: ArenaData) -> list[dict]:
    """One row per analysed checkpoint (step > 0) of a kept trial: its KL and each measure (general text)."""
    out = []
    for t in a.trials:
        kl = {p.step: kl_of(p) for p in t.points}
        for key, e in (t.analysis.get("steps") or {}).items():
            step = int(key)
            if step == 0 or step not in kl:
                continue
            row = {"trial": t.name, "method": t.method, "seed": t.seed, "step": step, "kl": kl[step]}
            gen = ((e.get("activations") or {}).get("general") or {}).get("mean", {})
            for name, where, _ in MEASURES:
                row[name] = gen.get(name) if where == "activations" else (e.get("weights") or {}).get(name)
            out.append(row)
    return out


def geometry(a: ArenaData) -> dict:
    rows = geometry_rows(a)
    corr = {}
    for name, _, label in MEASURES:
        pairs = [(r["kl"], r[name]) for r in rows if r.get(name) is not None]
        c = correlation([p[0] for p in pairs], [p[1] for p in pairs])
        corr[name] = {"label": label, "n": c.n, "pearson": c.pearson, "pearson_ci": list(c.pearson_ci),
                      "spearman": c.spearman, "spearman_ci": list(c.spearman_ci), "paper": PAPER.get(name),
                      "verdict": _corr_verdict(c, PAPER.get(name))}
    ranking = method_ranking(a, rows)
    key = [corr[k] for k in PAPER]
    text = "; ".join(f"{c['label']}: r {_r(c)} (n {c['n']}), paper {c['paper']:+.2f}: {c['verdict']}" for c in key)
    return {"rows": rows, "correlations": corr, "ranking": ranking, "answer": text + "."}


def _r(c: dict) -> str:
    if c["n"] < 2 or c["pearson"] is None or math.isnan(c["pearson"]):
        return "-"
    lo, hi = c["pearson_ci"]
    return f"{c['pearson']:+.2f}" + ("" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]")


def _corr_verdict(c, paper: float | None) -> str:
    if c.n < MIN_CORR_N or math.isnan(c.pearson):
        return f"not enough data (n {c.n}, need {MIN_CORR_N} analysed checkpoints)"
    lo, hi = c.pearson_ci
    if paper is None:
        return "significant" if lo > 0 or hi < 0 else "not significant (the interval spans zero)"
    same = (c.pearson > 0) == (paper > 0)
    if same and (lo > 0 or hi < 0):
        inside = lo <= paper <= hi
        return "reproduces" + ("" if inside else f" in sign; the paper's value lies outside the interval")
    if same:
        return "does not reproduce at this size: the sign agrees but the interval spans zero"
    return "does not reproduce at this size: the sign is opposite" + (
        "" if lo > 0 or hi < 0 else " (and the interval spans zero)")


def method_ranking(a: ArenaData, rows: list[dict]) -> dict:
    """Methods ranked by mean final KL and by each measure at each trial's last analysed checkpoint."""
    last = {}
    for r in rows:
        if r["trial"] not in last or r["step"] > last[r["trial"]]["step"]:
            last[r["trial"]] = r
    by_method: dict[str, list[dict]] = {}
    for r in last.values():
        by_method.setdefault(r["method"], []).append(r)
    means = {m: {k: mean_ci([r.get(k) for r in rs]).mean for k in ["kl"] + [n for n, _, _ in MEASURES]}
             for m, rs in by_method.items()}
    out = {"means": means, "agreement": {}}
    methods = sorted(means)
    for name, _, _ in MEASURES:
        ms = [m for m in methods if not math.isnan(means[m][name]) and not math.isnan(means[m]["kl"])]
        c = correlation([means[m]["kl"] for m in ms], [means[m][name] for m in ms])
        out["agreement"][name] = {"n": c.n, "spearman": c.spearman,
                                  "order_kl": sorted(ms, key=lambda m: means[m]["kl"]),
                                  # least forgetting first: a similarity (CKA) high, a distance low
                                  "order_measure": sorted(ms, key=lambda m: means[m][name],
                                                          reverse=name in SIMILARITIES)}
    return out


def answer_all(folder: Path, w: float = 0.5) -> dict:
    meta, arenas = load_study_data(folder)
    w = float((meta.get("study") or {}).get("best_alpha_w", w))
    out = {"study": meta, "arenas": []}
    for a in arenas:
        out["arenas"].append({"name": a.name, "model": a.model, "task": a.task, "kind": a.kind, "score": a.score,
                              "retention": a.retention, "trials": len(a.trials), "methods": a.methods(),
                              "seeds": sorted({t.seed for t in a.trials}),
                              "a": matched_forgetting(a), "b": frontier_volumes(a), "c": rewind_gains(a, w),
                              "d": oft_paths(a), "e": geometry(a), "data": a})
    return out
