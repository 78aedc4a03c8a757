"""Hand-written run and arena folders for the report tests: the same file shapes training, probes and the
arena write (trajectory.jsonl checkpoint + score lines, metrics.jsonl with eval lines, config.yaml,
provenance.json, arena.json, leaderboard.json), with hostile strings placed wherever data reaches the page."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

PAYLOADS = ("<script>alert(1)</script>", "</script><script>alert(2)</script>", '"><img src=x onerror=alert(3)>')
HOSTILE = " ".join(PAYLOADS)


def score(name: str, value: float, kind: str, hib: bool, half: float = 0.05, **extra) -> dict:
    return {"name": name, "value": value, "kind": kind, "higher_is_better": hib, "n": 16,
            "ci_low": value - half, "ci_high": value + half, "extra": extra, "seconds": 0.1}


def write_run(folder: Path, name: str, method: str, path: list[tuple[float, float]], hostile: bool = False,
              lr: float = 1e-3, unscored_step: bool = False) -> Path:
    """A run whose checkpoint i (step 2i; 0 = the base) scores path[i] = (task loss, kl to base).

    With `hostile`, the run name, method knobs, a probe name and the sample generations carry PAYLOADS."""
    folder.mkdir(parents=True)
    gen_name = f"generate {PAYLOADS[2]}" if hostile else "generate"
    lines = []
    for i, (task_loss, kl) in enumerate(path):
        step = 2 * i
        if step:
            lines.append({"step": step, "path": f"checkpoints/step-{step:06d}", "sha256": "ab" * 32, "time": 1.0})
        samples = [{"source": f"probe.jsonl:{k + 1}", "prompt": f"Question {k}? {HOSTILE if hostile else ''}",
                    "reference": f"answer {k}", "output": (f"step {step} says {PAYLOADS[k % 3]}" if hostile
                                                           else f"step {step} answer {k}")} for k in range(2)]
        lines.append({"step": step, "scores": {
            "heldout_loss": score("heldout_loss", task_loss, "task", False),
            "kl_to_base": score("kl_to_base", kl, "retention", False, half=0.0 if step == 0 else 0.002),
            gen_name: score(gen_name, 0.5 + 0.01 * i, "task", True, samples=samples,
                            dimensions=dimensions(i, hostile))}})
    if unscored_step:  # a checkpoint written but not yet scored: not a point on the plane
        lines.append({"step": 2 * len(path), "path": f"checkpoints/step-{2 * len(path):06d}", "sha256": "cd" * 32})
    text = "".join(json.dumps(x) + "\n" for x in lines)
    (folder / "trajectory.jsonl").write_text(text + '{"step": 99, "scores": {"torn', encoding="utf-8")
    metrics = [{"step": s, "loss": 3.0 * math.exp(-s / 5), "lr": lr, "grad_norm": 1.0, "tokens_per_s": 100.0 + s,
                "peak_mem_mb": 500.0, "elapsed": 0.5 * s} for s in range(1, 2 * len(path))]
    metrics += [{"step": s, "eval": True, "eval_loss": 3.2 * math.exp(-s / 6)} for s in (4, 2 * len(path) - 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    cfg = {"run": {"name": name}, "model": {"path": "tiny"},
           "method": {"name": method, "r": 4, "note": HOSTILE if hostile else "plain"},
           "train": {"steps": 2 * len(path), "lr": lr, "batch_size": 4, "schedule": "linear"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    prov = {"created": "2026-01-01T00:00:00+0000", "base_model": {"spec": HOSTILE if hostile else "tiny",
                                                                  "sha256": "0f" * 32},
            "trainable_params": 1234, "total_params": 56789, "sftlab_commit": "deadbeef"}
    (folder / "provenance.json").write_text(json.dumps(prov), encoding="utf-8")
    return folder


def dimensions(i: int, hostile: bool) -> dict:
    """The quality probe's writing dimensions at checkpoint i (a hostile dimension name and scale with `hostile`)."""
    def dim(mean: float, **meta) -> dict:
        return {"mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1, "n": 2, **meta}

    out = {"readability": dim(60.0 + i, scale="Flesch reading ease"), "grade_level": dim(8.0 - i, of="readability"),
           "empathy": dim(0.1 * i, scale="0-1"), "safety": dim(1.0, scale="0-1")}
    if hostile:
        out[f"judge {PAYLOADS[0]}"] = dim(3.0, scale=HOSTILE, of=PAYLOADS[1])
    return out


LORA_PATH = [(3.0, 0.0), (2.0, 0.01), (1.5, 0.02), (1.2, 0.05), (1.1, 0.09)]
FULL_PATH = [(3.0, 0.0), (1.8, 0.04), (1.0, 0.10), (0.9, 0.20)]


def write_arena(folder: Path, hostile: bool = True) -> Path:
    """Two trials with data (methods 'lora' and a hostile-named one), a failed trial without a folder, a
    leaderboard with arbitrary columns."""
    folder.mkdir(parents=True)
    other = f"full{PAYLOADS[0]}" if hostile else "full"
    write_run(folder / "trials" / "a", f"lora-r4 {PAYLOADS[1]}" if hostile else "lora-r4", "lora", LORA_PATH,
              hostile=hostile)
    write_run(folder / "trials" / "b", "full-1", other, FULL_PATH, unscored_step=True)
    trials = [{"name": f"lora-r4 {PAYLOADS[1]}" if hostile else "lora-r4", "method": "lora", "budget": 1e5,
               "lr": 1e-3, "seed": 0, "run_dir": "trials/a", "status": "done", "error": None,
               "trainable_params": 98304},
              {"name": "full-1", "method": other, "budget": None, "lr": 1e-5, "seed": 0, "run_dir": "trials/b",
               "status": "done", "error": None, "trainable_params": 135_000_000},
              {"name": "oft-1", "method": "oft", "budget": 1e5, "lr": 1e-3, "seed": 0, "run_dir": "trials/c",
               "status": "failed", "error": f"RuntimeError: {PAYLOADS[2]}" if hostile else "boom",
               "trainable_params": 0}]
    arena = {"name": f"arena {PAYLOADS[0]}" if hostile else "arena", "config": {"data": "chats.jsonl"},
             "trials": trials}
    (folder / "arena.json").write_text(json.dumps(arena), encoding="utf-8")
    board = {"task": "heldout_loss", "retention": "kl_to_base", "normalisation": "min-max over all points",
             "reference_point": [0.0, 0.0],
             "rows": [{"method": "lora", "hypervolume": 0.61234567, "trials": 1, "best_task": 1.1},
                      {"method": other, "hypervolume": 0.4, "trials": 1, f"note {PAYLOADS[2]}": PAYLOADS[1]}]}
    (folder / "leaderboard.json").write_text(json.dumps(board), encoding="utf-8")
    return folder


def scored_points(folder: Path) -> int:
    """Checkpoints scored on both plane axes, counted straight from the files (independent of sftlab)."""
    n = 0
    for traj in folder.rglob("trajectory.jsonl"):
        steps: dict[int, set] = {}
        for line in traj.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            steps.setdefault(e["step"], set()).update(e.get("scores", {}))
        n += sum(1 for names in steps.values() if {"heldout_loss", "kl_to_base"} <= names)
    return n
