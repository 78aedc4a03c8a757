"""Speed of the weight-space analysis: every linear module of SmolLM2-135M at one checkpoint.

    .venv/bin/python benchmarks/analysis_speed.py                                   # synthetic rank-8 update
    .venv/bin/python benchmarks/analysis_speed.py --run runs/trajectory_lora --step 40   # a real LoRA run
    taskset -c 0,1 python3 benchmarks/analysis_speed.py --random-base --threads 2       # torch only, no model

Wft is a real checkpoint merged by PEFT (--run) or W0 + a random rank-8 update per module (no run
needed). Wall time and CPU time (process_time, all threads) are both printed: on a shared machine the
wall time of a 1-thread run is its CPU time plus the time other processes held the core. Two passes over the same checkpoint: the first computes W0's SVDs (what the first step of
`sftlab analyze` pays), the second reuses them (what every later step pays). Model loading is timed
apart. Threads: torch's default (all cores) unless --threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def tuned_weights(base, names, run_dir: str | None, step: int | None, seed: int = 0,
                  modules: dict | None = None) -> dict[str, torch.Tensor]:
    if run_dir:
        from sftlab.runs import Run

        run = Run(run_dir)
        model, _ = run.load(step, merge=run.method.merge is not None)
        mods = dict(model.named_modules())
        return {n: mods[n].weight.detach() for n in names}
    g = torch.Generator().manual_seed(seed)
    mods = modules if modules is not None else dict(base.named_modules())
    out = {}
    for n in names:
        w = mods[n].weight.detach()
        b, a = torch.randn(w.shape[0], 8, generator=g), torch.randn(8, w.shape[1], generator=g)
        out[n] = w + 1e-3 * b @ a  # (out, in): a LoRA-sized rank-8 update
    return out


# SmolLM2-135M's linear modules per decoder layer: name -> (out, in); 30 layers.
SMOLLM2_SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
                  "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
                  "mlp.down_proj": (576, 1536)}


def random_base(layers: int = 30, seed: int = 0) -> dict[str, torch.Tensor]:
    """W0 with SmolLM2-135M's shapes and N(0, 0.02^2) entries: the same SVD work without the model files
    (for a quiet machine that has torch but not the converted model)."""
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.{k}": 0.02 * torch.randn(*shape, generator=g)
            for i in range(layers) for k, shape in SMOLLM2_SHAPES.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a run directory on SmolLM2 (default: synthetic update)")
    p.add_argument("--step", type=int, default=None, help="its checkpoint step (default: the last)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--random-base", action="store_true", help="random W0 of SmolLM2's shapes (no model needed)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sftlab.analysis import weights as wts
    from sftlab.analysis.run import layer_of, linear_names

    t0 = time.perf_counter()
    if args.random_base:
        weights = random_base()
        names = list(weights)
        mods = {n: torch.nn.Linear(*w.shape[::-1], bias=False) for n, w in weights.items()}
        for n, w in weights.items():
            mods[n].weight.data = w
        tuned = tuned_weights(None, names, None, None, modules=mods)
    else:
        from sftlab.models import load_model, resolve_model

        base = load_model(resolve_model("smollm2"), "float32")
        names = linear_names(base)
        mods = dict(base.named_modules())
        tuned = tuned_weights(base, names, args.run, args.step)
    t_load = time.perf_counter() - t0
    cache = wts.SVDCache()
    times, cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        res = {n: wts.module_metrics(mods[n].weight, tuned[n], cache.get(n, mods[n].weight)) for n in names}
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    agg = wts.aggregate(res, layer_of)
    out = {"modules": len(names), "params": sum(mods[n].weight.numel() for n in names),
           "load_s": round(t_load, 2), "first_step_s": round(times[0], 2), "cached_s": round(times[1], 2),
           "first_step_cpu_s": round(cpu[0], 2), "cached_cpu_s": round(cpu[1], 2),
           "threads": torch.get_num_threads(),
           "source": args.run or ("random W0, rank-8 update" if args.random_base else "SmolLM2 W0, rank-8 update"),
           "effective_rank_mean": round(agg.get("effective_rank", 0.0), 3), "intruders": agg.get("intruders"),
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    print(json.dumps(out))
    print(f"{len(names)} linear modules of SmolLM2-135M: {times[0]:.1f} s with W0's SVDs, {times[1]:.1f} s with "
          f"them cached (CPU time {cpu[0]:.1f} s / {cpu[1]:.1f} s; {torch.get_num_threads()} threads; model load "
          f"{t_load:.1f} s apart)")


if __name__ == "__main__":
    main()
