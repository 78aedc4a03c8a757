"""One `sftlab train` run, timed per step from its RUN/metrics.jsonl, for the CPU benchmark.

    .venv/bin/python benchmarks/sftlab_run.py --model /tmp/smol --data chats.jsonl \
        --method lora --policy padded --batch-size 4 --steps 12 --out sftlab.json

Writes a config for the job trl_run.py runs (same model, data, method, batch, steps, max_length,
lr, seed, threads; loss on every assistant turn; linear schedule, no warmup, no eval, no
checkpoints), runs `sftlab train CONFIG` as the only child of this process, and reports the
child's peak RSS from getrusage(RUSAGE_CHILDREN) once it has exited.

Contract with sftlab: RUN/metrics.jsonl holds one JSON line per step with `step`, `tokens`
(non-pad input tokens), `trained_tokens`, `step_time` (s), `tokens_per_s`, `peak_mem_mb`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(p)
    p.add_argument("--timeout", type=float, default=3600, help="seconds before the run is killed")
    p.add_argument("--sftlab-cmd", default=None,
                   help="command that starts sftlab's CLI (default: the `sftlab` script next to this Python, "
                        "else `python -m sftlab.cli`)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (printed)")
    return p.parse_args(argv)


def build_config(args, out_dir: str) -> dict:
    if args.method == "lora":
        method = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]}
    else:
        method = {"name": "full"}
    return {
        "run": {"name": "bench", "output_dir": out_dir, "seed": args.seed},
        "model": {"path": args.model, "dtype": "float32", "attn_implementation": "sdpa"},
        "method": method,
        "data": {"train": [{"path": os.path.abspath(args.data), "format": "chat"}],
                 "max_length": args.max_length, "packing": args.policy == "packed", "template": "chat",
                 "train_on_prompt": False, "assistant_turns": "all"},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": 1, "lr": args.lr,
                  "schedule": "linear", "warmup": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "precision": "fp32", "gradient_checkpointing": False, "threads": args.threads,
                  "eval_every": 0, "log_every": 1},
        "checkpoint": {"every": 0, "final": False},
        "logging": {"progress": False, "tensorboard": False},
    }


def sftlab_command(args) -> list[str]:
    if args.sftlab_cmd:
        import shlex

        return shlex.split(args.sftlab_cmd)
    script = Path(sys.executable).parent / "sftlab"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from sftlab.cli import main; sys.exit(main())"]


def read_metrics(path: Path) -> list[dict]:
    """The timed step lines of a metrics.jsonl (eval lines share the file)."""
    from sftlab.rundir_format import read_metrics as read_run_metrics

    return [r for r in read_run_metrics(path.parent)[0] if "tokens" in r and "step_time" in r]


def main(args) -> int:
    if args.model is None:
        args.model = common.default_model()
    import yaml

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="sftlab_bench_")
    cfg = build_config(args, work)
    cfg_path = Path(work) / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = sftlab_command(args) + ["train", str(cfg_path)]
    base = {"framework": "sftlab", "method": args.method, "policy": args.policy, "batch_size": args.batch_size,
            "steps": args.steps, "max_length": args.max_length, "lr": args.lr, "seed": args.seed,
            "threads": args.threads, "model": args.model, "data": args.data, "command": cmd, "config": cfg}

    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=common.child_env(args.threads), timeout=args.timeout, cwd=work,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rc, log = proc.returncode, proc.stdout
    except FileNotFoundError as e:
        rc, log = 127, str(e)
    except subprocess.TimeoutExpired as e:
        rc, log = -9, e.stdout if isinstance(e.stdout, str) else ""
    wall = time.perf_counter() - t0
    peak = common.children_peak_rss_mb()

    metrics_path = Path(work) / "bench" / "metrics.jsonl"
    per_step = read_metrics(metrics_path) if metrics_path.exists() else []
    if rc != 0 or not per_step:
        why = f"rc={rc}" if rc != 0 else f"no step lines in {metrics_path}"
        res = {**base, "ok": False, "returncode": rc, "error": f"{why}\n{log[-4000:]}", "wall_s": wall}
        out.write_text(json.dumps(res, indent=1))
        sys.stderr.write(log[-4000:] + "\n")
        print(f"[sftlab] {args.method}/{args.policy} FAILED ({why})", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return 1

    keep = ("step", "tokens", "trained_tokens", "step_time", "tokens_per_s", "peak_mem_mb", "loss")
    per_step = [{k: s[k] for k in keep if k in s} for s in per_step]
    stats = common.summarize(per_step)
    reported_peak = max((s.get("peak_mem_mb") or 0) for s in per_step) or None
    res = {**base, "ok": True, "returncode": 0, "per_step": per_step, "peak_rss_mb": peak,
           "peak_mem_mb_reported": reported_peak, "wall_s": wall, "log_tail": log[-2000:],
           "warmup_steps_discarded": common.WARMUP_STEPS, **stats}
    if len(per_step) != args.steps:
        res["warning"] = f"metrics.jsonl has {len(per_step)} step lines for {args.steps} steps"
    out.write_text(json.dumps(res, indent=1))
    if args.keep:
        print(f"[sftlab] run directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    mt = stats["median_tokens_per_s"]
    print(f"[sftlab] {args.method}/{args.policy}: median {mt:.1f} tok/s, overall {stats['overall_tokens_per_s']:.1f} "
          f"tok/s, peak RSS {peak:.0f} MB, {stats['mean_tokens_per_step']:.0f} tok/step, wall {wall:.1f}s"
          if mt is not None else f"[sftlab] {args.method}/{args.policy}: too few steps to measure, wall {wall:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
