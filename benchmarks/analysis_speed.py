"""Speed of the weight-space analysis: every linear module of SmolLM2-135M at one checkpoint.

    .venv/bin/python benchmarks/analysis_speed.py                                   # synthetic rank-8 update
    .venv/bin/python benchmarks/analysis_speed.py --run runs/trajectory_lora --step 40   # a real LoRA run

Wft is a real checkpoint merged by PEFT (--run) or W0 + a random rank-8 update per module (no run
needed). Two passes over the same checkpoint: the first computes W0's SVDs (what the first step of
`sftlab analyze` pays), the second reuses them (what every later step pays). Model loading is timed
apart. Threads: torch's default (all cores) unless --threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def tuned_weights(base, names, run_dir: str | None, step: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    if run_dir:
        from sftlab.runs import Run

        run = Run(run_dir)
        model, _ = run.load(step, merge=run.method.merge is not None)
        mods = dict(model.named_modules())
        return {n: mods[n].weight.detach() for n in names}
    g = torch.Generator().manual_seed(seed)
    mods = dict(base.named_modules())
    out = {}
    for n in names:
        w = mods[n].weight.detach()
        b, a = torch.randn(w.shape[0], 8, generator=g), torch.randn(8, w.shape[1], generator=g)
        out[n] = w + 1e-3 * b @ a  # (out, in): a LoRA-sized rank-8 update
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a run directory on SmolLM2 (default: synthetic update)")
    p.add_argument("--step", type=int, default=None, help="its checkpoint step (default: the last)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sftlab.analysis import weights as wts
    from sftlab.analysis.run import layer_of, linear_names
    from sftlab.models import load_model, resolve_model

    t0 = time.perf_counter()
    base = load_model(resolve_model("smollm2"), "float32")
    names = linear_names(base)
    tuned = tuned_weights(base, names, args.run, args.step)
    t_load = time.perf_counter() - t0
    mods = dict(base.named_modules())
    cache = wts.SVDCache()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        res = {n: wts.module_metrics(mods[n].weight, tuned[n], cache.get(n, mods[n].weight)) for n in names}
        times.append(time.perf_counter() - t0)
    agg = wts.aggregate(res, layer_of)
    out = {"modules": len(names), "params": sum(mods[n].weight.numel() for n in names),
           "load_s": round(t_load, 2), "first_step_s": round(times[0], 2), "cached_s": round(times[1], 2),
           "threads": torch.get_num_threads(), "source": args.run or "synthetic rank-8",
           "effective_rank_mean": round(agg.get("effective_rank", 0.0), 3), "intruders": agg.get("intruders"),
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    print(json.dumps(out))
    print(f"{len(names)} linear modules of SmolLM2-135M: {times[0]:.1f} s with W0's SVDs, {times[1]:.1f} s with "
          f"them cached ({torch.get_num_threads()} threads; model load {t_load:.1f} s apart)")


if __name__ == "__main__":
    main()
