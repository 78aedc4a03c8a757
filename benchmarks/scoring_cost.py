"""What scoring the checkpoints cost a run, next to its training time (issue 3's bar: at most +15% for the
10 checkpoints of the demo run).

    python benchmarks/scoring_cost.py runs/demo            # an arena folder: every trial
    python benchmarks/scoring_cost.py runs/trajectory_lora  # or run directories

Per run, from its own records (nothing is re-measured):
- training s: the sum of `step_time` in metrics.jsonl (forward, backward, optimizer; not checkpoint writes);
- wall s: the run's elapsed time at its last step minus the scorings inside it (checkpoint writes included);
- scoring s: the probes' own seconds (`seconds` of each score in trajectory.jsonl, written during training:
  lines after the run's end, such as `sftlab eval --generation`, are left out) at the checkpoints after step 0 (the step-0 scores are the base's, shared through the cache by every trial that starts there);
- the ratios scoring / training and scoring / wall.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sftlab.rundir_format import read_metrics, trajectory_lines


def cost(run: Path) -> dict:
    metrics = [m for m in read_metrics(run)[0] if "step_time" in m]
    traj = trajectory_lines(run)  # as written, in order: the line that ends training matters here
    ends = [i for i, e in enumerate(traj) if "scoring_seconds" in e]  # written when training ended
    traj = traj[:ends[0] + 1] if ends else traj  # later lines are offline scorings (e.g. the demo's generation)
    per_step: dict[int, float] = {}
    final = {}
    for e in traj:
        for name, s in e.get("scores", {}).items():
            if e["step"] > 0 and "seconds" in s:
                per_step[e["step"]] = per_step.get(e["step"], 0.0) + s["seconds"]
            if s.get("kind") in ("task", "retention"):
                final[s["kind"]] = (e["step"], s)
    train = sum(m["step_time"] for m in metrics)
    scoring = sum(per_step.values())
    last = metrics[-1]["step"] if metrics else 0
    # `elapsed` starts after step 0's scoring and is taken before the last step's checkpoint: the scorings
    # in between are inside it
    wall = metrics[-1]["elapsed"] - sum(v for k, v in per_step.items() if k < last) if metrics else 0.0
    return {"run": run.name, "steps": len(metrics), "scored checkpoints": len(per_step), "training s": train,
            "wall s": wall, "scoring s": scoring, "per scoring s": scoring / max(1, len(per_step)),
            "scoring/training": scoring / train if train else float("nan"),
            "scoring/wall": scoring / wall if wall else float("nan"),
            "tokens/step": sum(m["tokens"] for m in metrics) / max(1, len(metrics)), "final": final}


def runs_in(path: Path) -> list[Path]:
    if (path / "trials").is_dir():
        return sorted(p for p in (path / "trials").iterdir() if (p / "metrics.jsonl").is_file())
    return [path]


def main(argv: list[str]) -> None:
    rows = [cost(r) for a in argv for r in runs_in(Path(a))]
    print("| run | steps | scored checkpoints | tokens/step | training s | wall s | scoring s | per scoring s | "
          "scoring / training | scoring / wall | final task | final retention |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fin = {k: f"{v[1]['value']:.4g} (step {v[0]})" for k, v in r["final"].items()}
        print(f"| {r['run']} | {r['steps']} | {r['scored checkpoints']} | {r['tokens/step']:.0f} | "
              f"{r['training s']:.0f} | {r['wall s']:.0f} | {r['scoring s']:.1f} | {r['per scoring s']:.2f} | "
              f"{r['scoring/training']:.1%} | {r['scoring/wall']:.1%} | {fin.get('task', '-')} | "
              f"{fin.get('retention', '-')} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/demo"])
