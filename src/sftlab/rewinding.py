"""`sftlab frontier` and `sftlab rewind`: a run's scored trajectory -> frontier, overshoot, a chosen point."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import SftlabError
from .trajectory import Point, overshoot, pareto_front, point_from_scores, rewind, rule_text, select_params, shown


def pick_scores(entries: list[dict], task: str | None, retention: str | None) -> tuple[str, str]:
    """Default axes: the first task-kind and the first retention-kind score present."""
    seen: dict[str, str] = {}
    for e in entries:
        for name, s in e.get("scores", {}).items():
            seen.setdefault(name, s.get("kind", "task"))
    if not seen:
        raise SftlabError("no scores in trajectory.jsonl; add probes to the config and run: sftlab eval RUN")

    def choose(given, kind):
        if given:
            if given not in seen:
                raise SftlabError(f"no score named {given!r}; scores here: {', '.join(sorted(seen))}")
            return given
        for name, k in seen.items():
            if k == kind:
                return name
        raise SftlabError(f"no {kind} score in trajectory.jsonl; add a {kind} probe (e.g. "
                          f"{'kl_to_base' if kind == 'retention' else 'heldout_loss'}) and run sftlab eval RUN")

    return choose(task, "task"), choose(retention, "retention")


def run_points(run_dir: str | Path, task: str | None = None, retention: str | None = None):
    from .rundir_format import read_trajectory

    folder = Path(run_dir)
    if not (folder / "trajectory.jsonl").is_file() and not (folder / "config.yaml").is_file():
        raise SftlabError(f"{folder}: not a run directory (no trajectory.jsonl, no config.yaml); give the folder "
                          "`sftlab train` wrote")
    entries = read_trajectory(folder)
    t, r = pick_scores(entries, task, retention)
    points = [point_from_scores(e["step"], e["scores"][t], e["scores"][r], meta={"path": e.get("path")})
              for e in entries if t in e.get("scores", {}) and r in e.get("scores", {})]
    return points, t, r


def generation_steps(run_dir: str | Path) -> list[int]:
    """Where generation probes run by default: the base (0), the final checkpoint and the Pareto-frontier
    points of the cheap scores already in trajectory.jsonl (just base and final when there are none)."""
    from .runs import Run

    saved = [e["step"] for e in Run(run_dir).checkpoints() if e.get("path")]
    steps = {0} | ({max(saved)} if saved else set())
    try:
        points, _, _ = run_points(run_dir)
    except SftlabError:
        points = []
    steps |= {p.step for p in pareto_front(points) if p.step == 0 or p.step in saved}
    return sorted(steps)


def _fmt(score_value: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return f"{score_value:.4g}"
    return f"{score_value:.4g} [{lo:.4g}, {hi:.4g}]"


def frontier_report(run_dir: str, task: str | None = None, retention: str | None = None, tol: float = 0.0) -> str:
    from .rundir_format import read_trajectory

    points, t, r = run_points(run_dir, task, retention)
    if not points:
        raise SftlabError(f"{run_dir}: no checkpoint has both {t!r} and {r!r}; run sftlab eval {run_dir}")
    front = {p.step for p in pareto_front(points, tol)}
    by_step = {e["step"]: e for e in read_trajectory(Path(run_dir))}
    lines = [f"task: {t}   retention: {r}   (* = on the Pareto frontier, tol {tol})",
             f"{'step':>8}  {'':1}  {t + ' [95% CI]':<34}  {r + ' [95% CI]':<34}"]
    for p in points:
        st, sr = by_step[p.step]["scores"][t], by_step[p.step]["scores"][r]
        lines.append(f"{p.step:>8}  {'*' if p.step in front else ' '}  "
                     f"{_fmt(st['value'], st['ci_low'], st['ci_high']):<34}  "
                     f"{_fmt(sr['value'], sr['ci_low'], sr['ci_high']):<34}")
    over = overshoot(points, tol)
    final = max(points, key=lambda p: p.step)
    if over:
        lines.append(f"overshoot: the final checkpoint (step {final.step}) is dominated by step(s) "
                     f"{', '.join(str(p.step) for p in over)} beyond the confidence intervals; "
                     f"consider: sftlab rewind {run_dir} --policy knee -o OUT")
    else:
        lines.append(f"no overshoot: no earlier checkpoint beats the final one (step {final.step}) on one axis "
                     "without losing on the other, beyond the confidence intervals")
    return "\n".join(lines)


def config_rule(run_dir: str | Path) -> dict:
    """The run's `select:` section from its config.yaml ({} when absent: the default knee)."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    rule = cfg.get("select") if isinstance(cfg, dict) else None
    return select_params(rule if isinstance(rule, dict) else None)


def stated_policy(run_dir: str | Path, policy: str | None, params: dict) -> tuple[str, dict, str]:
    """(policy, params, what to call it): without --policy, the limits given on the command line, else the
    run config's `select:` rule (else the default knee)."""
    if policy:
        return policy, params, policy
    if "w" in params:
        raise SftlabError("--weight belongs to --policy weighted; add --policy weighted")
    if params:
        return "select", params, "select (command line)"
    rule = config_rule(run_dir)
    return "select", rule, f"the run config's {rule_text(rule)}"


def rewind_run(run_dir: str, policy: str | None, out: str | None, params: dict, task: str | None = None,
               retention: str | None = None, search: list[float] | None = None, merge: bool = True,
               exporter=None) -> str:
    """Choose a point with `policy` (None: the config's `select:` rule), optionally search between checkpoints,
    export it; return the why. `exporter` (export.write.export_run, passed in by the CLI: it sits above this
    layer) writes the export with its model card; without it, runs.export / interpolate.export_at."""
    from .runs import Run, export

    points, t, r = run_points(run_dir, task, retention)
    policy, params, called = stated_policy(run_dir, policy, params)
    choice = rewind(points, policy, **params)
    lines = [f"chosen: step {choice.point.step} by {called}: {choice.reason}",
             f"  {shown(choice.point, 'task')}; {shown(choice.point, 'retention')}"]
    step, alpha = choice.point.step, None
    run = Run(run_dir)
    if search and step > 0:
        step, alpha, why = _search(run, step, search, policy, params, t, r, points)
        lines.append(why)
    if out:
        if step == 0:
            raise SftlabError("the chosen point is the base model (step 0): nothing to export; the fine-tuning "
                              "did not pay off under this policy")
        if exporter is not None:
            exporter(run_dir, out, step=step, alpha=alpha, merge=merge and run.method.merge is not None,
                     rule=called, reason=choice.reason)
        elif alpha is None or alpha == 1.0:
            export(run_dir, step, out, merge and run.method.merge is not None)
        else:
            from .interpolate import export_at

            export_at(run, step, alpha, out, merge=True)
        lines.append(f"exported to {out}")
    return "\n".join(lines)


def _search(run, step, alphas, policy, params, t, r, points):
    from .interpolate import search
    from .scoring import build_probes, context_for, score_model

    probes = [p for p in build_probes(run.cfg, "all") if p.name in (t, r)]
    ctx = context_for(run.cfg, run.base_ref())

    def score_fn(model, tokenizer, s, a) -> Point:
        scores = score_model(model, tokenizer, probes, ctx)
        return point_from_scores(s, scores[t], scores[r], alpha=a)

    base = next((p for p in points if p.step == 0), None)
    res = search(run, step, alphas, score_fn, policy, base=base, **params)
    p = res.choice.point
    return p.step, p.alpha, f"search between the base and step {step} (alphas {alphas}): {res.choice.reason}"
