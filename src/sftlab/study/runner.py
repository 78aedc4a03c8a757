"""Run (or resume) a study: per (model, task), in order, each stage skipped when its output is complete.

1. the arena (`sftlab.arena.run_arena`: finished trials are skipped, a stopped one resumes);
2. a generative task: the generation probe at every checkpoint still without its score (`sftlab eval
   --generation` on those steps), then the leaderboard again, now on the generation score;
3. paths: for each kept trial (the learning rate its method keeps, per seed) the model at each alpha of
   the grid between the base and the final checkpoint, scored by the task and retention probes, written to
   ARENA/paths/TRIAL.json kind by kind (the method's own path; for OFT/BOFT also the dense delta);
4. geometry: `sftlab analyze` on `analyze_steps` evenly spaced checkpoints of each kept trial.

The findings page is rewritten after each (model, task), so a long study shows what it has so far.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..rundir_format import LEADERBOARD, read_trajectory
from .config import STUDY_FILE, StudySection, load_study, plan, study_from_dict
from .stats import evenly

PATHS = "paths"


def run_study(path: str | dict, overrides: list[str] = (), plan_only: bool = False,
              findings_only: bool = False) -> Path:
    """Run (or resume) the study of a config file or dict; returns its folder."""
    from ..configtools import to_dict
    from ..scoring import write_json_atomic
    from .findings import write_findings

    study, base = study_from_dict(path) if isinstance(path, dict) else load_study(path, overrides)
    entries = plan(study, base)
    folder = study.folder
    print(f"study {study.name}: {len(entries)} arena(s) -> {folder}: "
          + ", ".join(f"{e['name']} ({e['kind']} task, score {e['score']})" for e in entries), flush=True)
    if plan_only:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / STUDY_FILE, {"name": study.name, "study": to_dict(study), "config": base,
                                            "arenas": [{k: v for k, v in e.items() if k != "config"}
                                                       for e in entries]})
    if not findings_only:
        for i, e in enumerate(entries, 1):
            t0 = time.time()
            print(f"\nstudy: arena {i}/{len(entries)}: {e['name']}", flush=True)
            run_entry(study, e)
            print(f"study: {e['name']} done in {time.time() - t0:.0f} s", flush=True)
            write_findings(folder, study.findings or None)
    out = write_findings(folder, study.findings or None)
    print(f"\nfindings: {out}")
    return folder


def run_entry(study: StudySection, entry: dict) -> None:
    import yaml

    from ..arena import run_arena
    from ..arena.runner import leaderboard_for

    cfg = entry["config"]
    folder = Path(cfg["arena"]["output_dir"]) / cfg["arena"]["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arena.yaml").write_text(f"# made by sftlab study; alone: sftlab arena {folder}/arena.yaml\n"
                                       + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    run_arena(cfg)
    if entry["kind"] == "generative":
        if score_generation(folder, entry["score"]):
            leaderboard_for(folder)
    board = _read_json(folder / LEADERBOARD)
    kept = [t for t in board.get("trials", []) if t.get("kept")]
    for t in kept:
        score_paths(folder, t, study.alphas, entry["score"], entry["retention"])
    if study.analyze:
        for t in kept:
            analyse_trial(folder / "trials" / t["trial"], study)


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def done_trials(folder: Path) -> list[Path]:
    from ..rundir_format import read_arena

    return [folder / t["run_dir"] for t in read_arena(folder)["trials"] if t.get("status") == "done"]


def score_generation(folder: Path, score: str) -> int:
    """The generation probe at every saved checkpoint (and step 0) that lacks `score`; returns how many ran."""
    from ..scoring import evaluate_run

    ran = 0
    for d in done_trials(folder):
        entries = read_trajectory(d)
        have = {e["step"] for e in entries if score in (e.get("scores") or {})}
        want = {0} | {e["step"] for e in entries if e.get("path")}
        missing = sorted(want - have)
        if missing:
            print(f"study: {d.name}: generation at step(s) {missing}", flush=True)
            evaluate_run(str(d), missing, which="generation", base=0 in missing, progress=False)
            ran += len(missing)
    return ran


def path_kinds(run) -> list[str]:
    """The paths a run's method has: its own (additive or rotation), and for rotations also the dense delta."""
    from ..methods.merge import paths_of

    return [m.kind for m in paths_of(run.method.merge)]


def score_paths(folder: Path, trial: dict, alphas: list[float], task: str, retention: str) -> Path | None:
    """ARENA/paths/TRIAL.json: {trial, method, seed, lr, step, kinds: {kind: [{alpha, scores}]}}; a kind whose
    grid is complete is skipped, each finished kind is written at once."""
    from ..runs import Run
    from ..scoring import build_probes, context_for, score_model, write_json_atomic

    d = folder / "trials" / trial["trial"]
    run = Run(d)
    kinds = path_kinds(run)
    if not kinds:
        return None
    out = folder / PATHS / f"{trial['trial']}.json"
    data = _read_json(out) or {"trial": trial["trial"], "method": trial["method"], "seed": trial["seed"],
                                "lr": trial["lr"], "step": trial["final_step"], "task": task,
                                "retention": retention, "kinds": {}}
    grid = sorted({float(a) for a in alphas})
    todo = [k for k in kinds if sorted(p["alpha"] for p in data["kinds"].get(k, [])) != grid]
    if not todo:
        return out
    from ..interpolate import Interpolator

    probes = [p for p in build_probes(run.cfg, "all") if p.name in (task, retention)]
    ctx = context_for(run.cfg, run.base_ref())
    for kind in todo:
        t0 = time.time()
        interp = Interpolator(run, trial["final_step"], kind=kind)
        points = []
        for a in grid:
            scores = score_model(interp.at(a), interp.tokenizer, probes, ctx)
            points.append({"alpha": a, "scores": {n: _slim(s) for n, s in scores.items()}})
        del interp
        data["kinds"][kind] = points
        write_json_atomic(out, data)
        print(f"study: {trial['trial']}: {kind} path at alphas {grid} in {time.time() - t0:.0f} s", flush=True)
    return out


def _slim(score: dict) -> dict:
    """A score dict without its kept generations (the path files stay small)."""
    extra = {k: v for k, v in (score.get("extra") or {}).items() if k != "samples"}
    return {**score, "extra": extra}


def analysis_steps(run_dir: Path, k: int) -> list[int]:
    steps = [e["step"] for e in read_trajectory(run_dir) if e.get("path") and e["step"] > 0]
    return evenly(sorted(steps), k)


def analyse_trial(run_dir: Path, study: StudySection) -> None:
    """`sftlab analyze` on the trial's evenly spaced checkpoints that have no activations in summary.json yet."""
    from ..analysis import AnalyzeOptions, analyze_run

    steps = analysis_steps(run_dir, study.analyze_steps)
    have = _read_json(run_dir / "analysis" / "summary.json").get("steps", {})
    missing = [s for s in steps if "activations" not in have.get(str(s), {})]
    if not missing:
        return
    t0 = time.time()
    analyze_run(run_dir, AnalyzeOptions(steps=",".join(map(str, missing)), layers=study.analyze_layers,
                                        n_texts=study.analyze_texts, progress=False))
    print(f"study: {run_dir.name}: analysed step(s) {missing} in {time.time() - t0:.0f} s", flush=True)
