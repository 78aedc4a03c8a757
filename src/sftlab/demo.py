"""`sftlab demo`: an arena on the embedded SmolLM2-135M-Instruct - which method learns the task, and what
does each forget on the way?

Task ("wiki desks", sftlab.assets): route a Wikipedia article's opening to one of eight desks by its code
letter, a scheme the prompt does not give (the base model is at chance; only fine-tuning can teach it).
Task score: label-scoring accuracy on held-out articles (the majority-class baseline is about 12.5%).
Retention: KL divergence from the base model on general English (Wikipedia lead sections the task never
uses), per token. Methods: full fine-tuning (the reference) and LoRA, OFT, prefix tuning and prompt
tuning at a matched trainable-parameter budget, each at the learning rate a recorded sweep chose
(DEVELOPERS.md: the command and its results). Every trial is scored at the same checkpoints; the
leaderboard ranks methods by the hypervolume of their trajectories; `report.html` shows the plane.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .assets import DemoData, prepare_assets
from .errors import SftlabError
from .rundir_format import read_arena, read_trajectory


@dataclass(frozen=True)
class DemoPlan:
    methods: tuple[str, ...]
    steps: int
    batch_size: int
    checkpoint_every: int
    n_task: int  # held-out articles scored at every checkpoint
    n_general: int  # general-English passages for the KL to the base
    n_generate: int  # articles answered by greedy generation (base and final checkpoints, kept for reading)
    kl_length: int = 64  # tokens per general-English passage


# Ten scored checkpoints per trial (every `checkpoint_every` of `steps`): the trajectory the leaderboard and
# the report are about. The probes are sized so that scoring stays a small part of a trial (BENCHMARKS.md).
FULL = DemoPlan(("full", "lora", "oft", "prefix", "prompt"), steps=60, batch_size=8, checkpoint_every=6,
                n_task=24, n_general=4, n_generate=8)
QUICK = DemoPlan(("lora", "oft"), steps=36, batch_size=8, checkpoint_every=6, n_task=24, n_general=4,
                 n_generate=4)
# About 1% of the base's parameters, the range published comparisons use (0.1-2%): LoRA rank 4 on every linear
# layer of all 30 layers (1.22M), OFT block 32 on the MLP projections (1.35M), prefix tuning 117 virtual tokens.
BUDGET = "1%"
# Prompt tuning would need ~2,300 soft-prompt tokens for 1% (each token is one row of 576): no real setting, and
# 20x the work of every row. It runs at 20 tokens (Lester et al. 2021 used 20-100), below the budget, and the
# leaderboard flags it ('!', more than 10% off).
METHOD_OPTIONS = {"prompt": {"num_virtual_tokens": 20}}
# Each method trains at its registered default_lr: the rate the sweep recorded in DEVELOPERS.md chose (largest
# hypervolume per method), which `sftlab demo --sweep` reruns: the same arena with SWEEP_LRS (full fine-tuning does
# not depend on the budget: its rate comes from the first sweep, DEVELOPERS.md).
SWEEP_LRS = {"full": [1e-4], "lora": [1e-3, 3e-3], "oft": [1e-3, 3e-3, 1e-2], "prefix": [1e-2, 3e-2],
             "prompt": [1e-2, 3e-2]}


def demo_arena(data: DemoData, plan: DemoPlan, output_dir: str, name: str, sweep: bool = False) -> dict:
    """The arena config, as a user would write it in YAML (it is saved next to the results)."""
    from .methods import default_lr

    lrs = {m: (SWEEP_LRS[m] if sweep else [default_lr(m)]) for m in plan.methods}
    return {
        "arena": {"name": name, "output_dir": output_dir, "methods": list(plan.methods), "budgets": [BUDGET],
                  "method_options": {m: o for m, o in METHOD_OPTIONS.items() if m in plan.methods},
                  "lrs": lrs, "task": "classify", "retention": "kl_to_base"},
        "run": {"seed": 0},
        "model": {"path": "smollm2"},
        "data": {"train": [{"path": str(data.train)}], "max_length": 192},
        "train": {"steps": plan.steps, "batch_size": plan.batch_size, "schedule": "linear", "warmup": 0.1,
                  "precision": "bf16",  # autocast: ~4x faster than fp32 on CPUs with AMX, and on GPUs
                  "fused_optimizer": True},  # full fine-tuning's AdamW step: 0.2 s instead of 0.8 s on 2 cores
        # The resume state (weights + optimizer: 1.6 GB for full fine-tuning) half-way and at the end, not at
        # each of the ten checkpoints: writing it cost full fine-tuning ~4 s a checkpoint.
        "checkpoint": {"every": plan.checkpoint_every, "resume_every": plan.steps // 2},
        "scoring": {"batch_size": plan.n_task},  # one batch per probe: fewer, larger forward passes
        "logging": {"progress": True, "tensorboard": False},
        "probes": [
            {"name": "classify", "path": str(data.eval), "limit": plan.n_task, "labels": list(data.labels)},
            {"name": "kl_to_base", "n": plan.n_general, "max_length": plan.kl_length},
            {"name": "generate", "path": str(data.eval), "limit": plan.n_generate, "max_new_tokens": 3,
             "labels": list(data.labels), "samples": plan.n_generate},
        ],
    }


def run_demo(quick: bool = False, output_dir: str = "runs", plan: DemoPlan | None = None,
             sweep: bool = False) -> Path:
    """Run the demo arena, answer with generation at the base and each method's final checkpoint, print the
    leaderboard and write the report; returns the arena folder."""
    import yaml

    from .arena import run_arena
    from .arena.runner import leaderboard_for
    from .report import render_report

    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise SftlabError(f"--output-dir {output_dir}: a file, not a folder; give a folder for the demo's arena")
    t0 = time.time()
    plan = plan or (QUICK if quick else FULL)
    data = prepare_assets(verbose=True)
    name = "demo-sweep" if sweep else "demo-quick" if quick else "demo"
    cfg = demo_arena(data, plan, output_dir, name, sweep)
    folder = Path(output_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arena.yaml").write_text(f"# rerun (resumes, skips finished trials): sftlab arena {folder}/arena.yaml\n"
                                       + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    print(f"\nTask: route a Wikipedia article's opening to a desk by its code letter ({', '.join(data.labels)}; "
          "the prompt does not say which is which).\n"
          f"Methods: {', '.join(plan.methods)} at ~{BUDGET} trainable parameters (full: all of them), "
          f"{plan.steps} steps of {plan.batch_size} examples, scored every {plan.checkpoint_every} steps.",
          flush=True)
    run_arena(cfg)
    if not sweep:
        _generate_samples(folder)
    board = leaderboard_for(folder)
    report = render_report(folder)
    print(summary(board, time.time() - t0, base_scores(folder), printed=True))  # run_arena printed the board
    print(f"\nreport: {report}\narena:  {folder}  (rerun: sftlab arena {folder}/arena.yaml)")
    return folder


def _generate_samples(folder: Path) -> None:
    """Greedy answers at the base (once) and at each finished trial's final checkpoint, for people to read."""
    from .runs import Run
    from .scoring import evaluate_run

    meta = read_arena(folder)
    done = [folder / t["run_dir"] for t in meta["trials"] if t["status"] == "done"]
    print(f"\ngreedy answers for reading: the base and {len(done)} final checkpoint(s)", flush=True)
    for i, d in enumerate(done):
        have = {e["step"] for e in Run(d).trajectory() if "generate" in e.get("scores", {})}
        final = max((e["step"] for e in Run(d).checkpoints() if e.get("path")), default=None)
        steps = [s for s in ([0] if i == 0 else []) + ([final] if final else []) if s not in have]
        if steps:
            evaluate_run(str(d), steps, which="generation", progress=False)


def base_scores(folder: Path) -> dict | None:
    """The base model's classify score (step 0 of a trial that starts at the base), for the summary."""
    from .methods import resolve

    for t in read_arena(folder)["trials"]:
        if not resolve(t["method"])[0].starts_at_base:  # virtual tokens: step 0 is not the base
            continue
        for e in read_trajectory(folder / t["run_dir"]):
            if e["step"] == 0 and "classify" in e.get("scores", {}):
                return e["scores"]["classify"]
    return None


def summary(board: dict, seconds: float, base: dict | None = None, printed: bool = False) -> str:
    from .arena import format_leaderboard

    lines = ["", format_leaderboard(board), ""] if not printed else [""]
    trials = [t for t in board.get("trials", []) if t.get("kept")]
    if trials:
        lines.append("Task accuracy (label scoring, held-out articles; 95% bootstrap CI), final checkpoint:")
        if base:
            lines.append(f"  {'base':<8}{base['value']:>7.1%}  [{base['ci_low']:.1%}, {base['ci_high']:.1%}]   "
                         f"(always the most common label: {base['extra'].get('majority_baseline', 0):.1%})")
        for t in sorted(trials, key=lambda t: -t["final_task"]):
            lo, hi = t["final_task_ci"]
            lines.append(f"  {t['method']:<8}{t['final_task']:>7.1%}  [{lo:.1%}, {hi:.1%}]   KL to base "
                         f"{t['final_retention']:.4f} nats/token")
    lines.append(f"\ndemo took {seconds / 60:.1f} min")
    return "\n".join(lines)
