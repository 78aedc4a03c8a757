"""sftlab's fast path vs TRL SFTTrainer on one GPU (issue 9): throughput, peak memory, MFU, longest sequence.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_speed.py --out $OUT        # H100: <= ~7 min (see --budget-s)
    .venv/bin/python benchmarks/gpu_speed.py --out /tmp/gs --device cpu --tiny  # end-to-end check on CPU

Reuses gpu_compare.py's model builder, data generator, TRL runner and sftlab step timer (one process,
one GPU; runs one after another, memory and torch.compile caches freed in between).

Workload (TRL's, issue 9): random-init models of real shapes with the real SmolLM2 tokenizer, synthetic
single-turn chats, assistant-only loss.
  135M rows: SmolLM2-135M shape, lengths uniform in 64..1024, batch 16, max_length 1024.
  1B row:    Llama 1.2B shape (vocab 128256, hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192,
             tied, 1,235,814,400 params), lengths 64..2048, batch 8, max_length 2048, full fine-tuning.
  probe:     the 1B shape, batch 1, one example of L tokens, L doubled until a run fails (OOM) or the probe's
             time is up; gradient checkpointing on both sides (--probe-no-gc to turn it off).

Variants:
  trl            TRL 1.16 SFTTrainer as the issue measured it: model loaded in bf16 (pure bf16 training,
                 bf16=True), rows padded to the batch's longest (--trl-policy packed: padding-free packing),
                 adamw_torch, sdpa.
  sftlab_fast    packed rows (FFD) padded to a multiple of 256 (--bucket), model.attn_implementation=
                 flex_attention (document masks; sdpa on CPU), train.compile (per decoder layer),
                 train.fused_optimizer, pure bf16 (model.dtype=bfloat16, no autocast), chunked CE (never
                 the full logits).
  sftlab_mixed   the same with fp32 master weights + bf16 autocast (model.dtype=float32,
                 train.precision=bf16) and sdpa (document masks as a 4D mask): under autocast flex_attention
                 would get fp32 queries/keys and bf16 values, which it rejects.
Everything else as gpu_compare.py: lr 1e-4 linear, no warmup, wd 0, clip 1.0, no eval/saving.

Throughput: non-pad input tokens per second of synchronized step wall time, over the steps after
--warmup (the first steps hold the compile). MFU (full fine-tuning only, as the issue defines it):
6 N tok/s / 790 TFLOP/s, N = all parameters including the (tied) embedding, attention FLOPs not
counted. Peak memory: torch.cuda.max_memory_allocated per run.

Order of runs (most important first; a run that would not finish within --budget-s, by its estimate,
is skipped and marked so): 135M LoRA (TRL, sftlab_fast), 135M full (TRL, sftlab_fast), 1B full
(sftlab_fast), probe (sftlab, TRL), then sftlab_mixed rows and, with --trl-1b, TRL on the 1B row (else
TRL's 17.4k tok/s from the issue is quoted in the table, marked as such). Results (gpu_speed.json, .md)
are rewritten after every run, so a timeout still leaves everything done so far.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_compare as gc_  # noqa: E402  (helpers: model, data, TRL runner, sftlab step timer)

LLAMA_1B_SHAPE = dict(gc_.SMOLLM2_SHAPE, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      rope_theta=500000.0, max_position_embeddings=131072)
TINY_1B_SHAPE = dict(LLAMA_1B_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TRL_1B_ISSUE_TOK_S = 17400.0  # TRL 1.16, 1.2B full packed, as measured in issue 9
PEAK_TFLOPS = 790.0  # the issue's bf16 dense peak for MFU


def log(msg: str) -> None:
    print(f"[gpu_speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_speed_out")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer models, short examples, few steps (CPU check)")
    p.add_argument("--budget-s", type=float, default=390.0, help="skip runs whose estimate passes this (total)")
    p.add_argument("--steps", type=int, default=None, help="135M runs (default 25; tiny 5)")
    p.add_argument("--steps-1b", type=int, default=None, help="1B runs (default 15; tiny 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the statistics (default 6; tiny 2)")
    p.add_argument("--bucket", type=int, default=None, help="data.pad_to_multiple (default 256; tiny 32)")
    p.add_argument("--trl-policy", choices=["padded", "packed"], default="padded")
    p.add_argument("--trl-1b", action="store_true", help="also run TRL on the 1B row (else the issue's number)")
    p.add_argument("--no-compile", action="store_true", help="sftlab without train.compile (e.g. a quick CPU check)")
    p.add_argument("--only", default="", help="comma list of rows (135m_lora, 135m_full, 1b_full, probe) or runs "
                   "(ROW/trl, ROW/sftlab_fast, ROW/sftlab_mixed); default all")
    p.add_argument("--probe-lengths", default=None, help="comma list (default 8192..131072 doubling; tiny 256,512)")
    p.add_argument("--probe-budget-s", type=float, default=120.0, help="time for the probe, both frameworks")
    p.add_argument("--probe-no-gc", action="store_true", help="probe without gradient checkpointing")
    p.add_argument("--probe-compile", action="store_true", help="probe sftlab with train.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--work", default=None)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    t = a.tiny
    a.steps = a.steps or (5 if t else 25)
    a.steps_1b = a.steps_1b or (4 if t else 15)
    a.warmup = a.warmup if a.warmup is not None else (2 if t else 6)
    a.bucket = a.bucket if a.bucket is not None else (32 if t else 256)
    a.probe_lengths = [int(x) for x in (a.probe_lengths or ("256,512" if t else "8192,16384,32768,65536,131072"))
                       .split(",")]
    a.only = {x.strip() for x in a.only.split(",") if x.strip()}
    a.precision = "bf16"
    a.batch_size = a.max_length = None  # set per run
    return a


def workloads(a) -> dict:
    t = a.tiny
    return {
        "135m": {"shape": gc_.TINY_SHAPE if t else gc_.SMOLLM2_SHAPE, "batch": 4 if t else 16,
                 "max_length": 128 if t else 1024, "min_tokens": 48 if t else 64, "steps": a.steps, "dtype": "float32"},
        "1b": {"shape": TINY_1B_SHAPE if t else LLAMA_1B_SHAPE, "batch": 2 if t else 8,
               "max_length": 192 if t else 2048, "min_tokens": 48 if t else 64, "steps": a.steps_1b,
               "dtype": "bfloat16"},
    }


def plan_runs(a) -> list[dict]:
    """(id, workload, method, framework, variant, estimate s) in priority order."""
    runs = [("135m_lora", "135m", "lora", "trl", "trl", 45), ("135m_lora", "135m", "lora", "sftlab", "fast", 60),
            ("135m_full", "135m", "full", "trl", "trl", 45), ("135m_full", "135m", "full", "sftlab", "fast", 60),
            ("1b_full", "1b", "full", "sftlab", "fast", 70), ("probe", "1b", "full", "both", "probe", 0),
            ("135m_lora", "135m", "lora", "sftlab", "mixed", 50), ("135m_full", "135m", "full", "sftlab", "mixed", 50),
            ("1b_full", "1b", "full", "sftlab", "mixed", 70)]
    if a.trl_1b:
        runs.append(("1b_full", "1b", "full", "trl", "trl", 90))
    out = [dict(row=r, workload=w, method=m, framework=f, variant=v, estimate_s=e,
                key="trl" if f == "trl" else "probe" if v == "probe" else f"sftlab_{v}")
           for r, w, m, f, v, e in runs]
    return [r for r in out if not a.only or f"{r['row']}/{r['key']}" in a.only or r["row"] in a.only]


def sftlab_raw(a, wl: dict, method: str, variant: str, model_dir: Path, data: Path, out_dir: Path, name: str,
               *, steps: int, batch: int, max_length: int, packing: bool = True, gc_on: bool = False,
               compile_on: bool = True) -> dict:
    cuda = a.device == "cuda"
    pure = variant != "mixed"
    m = ({"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]}
         if method == "lora" else {"name": "full"})
    return {
        "run": {"name": name, "output_dir": str(out_dir), "seed": a.seed},
        "model": {"path": str(model_dir), "dtype": "bfloat16" if pure else "float32",
                  # flex_attention refuses autocast (fp32 q/k, bf16 v: see sftlab.train.speed.check_attention)
                  "attn_implementation": "flex_attention" if cuda and pure else "sdpa"},
        "method": m,
        "data": {"train": [{"path": str(data), "format": "chat"}], "max_length": max_length, "packing": packing,
                 "template": "chat", "train_on_prompt": False, "assistant_turns": "all",
                 "pad_to_multiple": a.bucket if packing else 0},
        "train": {"steps": steps, "batch_size": batch, "grad_accum": 1, "lr": a.lr, "schedule": "linear",
                  "warmup": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": "fp32" if pure else "bf16",
                  "gradient_checkpointing": gc_on, "threads": a.threads, "eval_every": 0, "log_every": 1,
                  "compile": compile_on and not a.no_compile, "fused_optimizer": True},
        "checkpoint": {"every": 0, "final": False},
        "logging": {"progress": False, "tensorboard": False},
    }


def fresh(device: str) -> float:
    """Free memory and torch.compile state between runs (dynamo's per-code cache would otherwise fill up
    with every earlier run's graphs); returns MiB still allocated."""
    try:
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    return gc_.mem_reset(device)


def trl_args(a, wl: dict, steps: int, batch: int, max_length: int, gc_on: bool = False) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(a), "steps": steps, "batch_size": batch, "max_length": max_length,
                                 "precision": "bf16" if a.device == "cuda" else "fp32", "trl_dtype": "bfloat16"
                                 if a.device == "cuda" else "float32", "gradient_checkpointing": gc_on})


def one_run(a, r: dict, wl: dict, model: dict, data: dict, work: Path) -> dict:
    """One training run (TRL or sftlab) on a workload; returns its record (stats, memory, mfu, compile)."""
    from sftlab.train import speed

    steps, batch, L = wl["steps"], wl["batch"], wl["max_length"]
    leftover = fresh(a.device)
    rec: dict = {"leftover_mb_before": leftover, "variant": r["variant"], "framework": r["framework"]}
    if r["framework"] == "trl":
        policy = "packed" if (a.trl_policy == "packed" or r["workload"] == "1b") else "padded"
        res = gc_.run_trl(trl_args(a, wl, steps, batch, L), r["method"], policy, model["dir"], data[policy], work)
        rec["config"] = {"policy": policy, "dtype": "bfloat16 (pure)" if a.device == "cuda" else "float32"}
    else:
        name = f"{r['row']}_{r['variant']}"
        raw = sftlab_raw(a, wl, r["method"], r["variant"], model["dir"], data["packed"], work / "sftlab_runs", name,
                         steps=steps, batch=batch, max_length=L)
        res = gc_.run_sftlab(trl_args(a, wl, steps, batch, L), r["method"], "packed", model["dir"], data["packed"],
                             work, raw=raw)
        rec["compile"] = speed.compile_stats()
        per = res["per_step"]
        rec["first_step_s"] = per[0]["step_wall"] if per else None
    gc_.sync(a.device)
    rec.update(ok=True, memory=gc_.mem_peak(a.device), **res)
    if "peak_alloc_mb" in rec["memory"]:
        rec["memory"]["peak_net_mb"] = rec["memory"]["peak_alloc_mb"] - leftover
    rec["stats"] = gc_.summarize(res["per_step"], a.warmup)
    tok_s = rec["stats"].get("overall_tokens_per_s")
    rec["mfu"] = (6 * model["params"] * tok_s / (PEAK_TFLOPS * 1e12)
                  if a.device == "cuda" and r["method"] == "full" and tok_s else None)
    return rec


def probe(a, model: dict, work: Path, framework: str, deadline: float) -> list[dict]:
    """Double the sequence length (batch 1, one example of L tokens) until a run fails or time is up."""
    out, last_s = [], 0.0
    gc_on = not a.probe_no_gc
    for L in a.probe_lengths:
        if time.perf_counter() + 1.5 * last_s > deadline:
            out.append({"length": L, "ok": None, "skipped": "probe time up"})
            log(f"probe/{framework} L={L}: skipped (probe time up)")
            break
        t0 = time.perf_counter()
        leftover = fresh(a.device)
        path = work / f"probe_{L}.jsonl"
        rec: dict = {"length": L, "leftover_mb_before": leftover}
        try:
            if not path.exists():
                gc_.make_data(path, model["dir"], 3, max(8, L - 64), L - 8, a.seed)
            if framework == "trl":
                res = gc_.run_trl(trl_args(a, None, 2, 1, L, gc_on), "full", "padded", model["dir"], path, work)
            else:
                raw = sftlab_raw(a, None, "full", "fast", model["dir"], path, work / "sftlab_runs", f"probe_{L}",
                                 steps=2, batch=1, max_length=L, packing=False, gc_on=gc_on,
                                 compile_on=a.probe_compile)
                res = gc_.run_sftlab(trl_args(a, None, 2, 1, L), "full", "padded", model["dir"], path, work, raw=raw)
            gc_.sync(a.device)
            rec.update(ok=True, memory=gc_.mem_peak(a.device), tokens=[s["tokens"] for s in res["per_step"]],
                       step_s=[s["step_wall"] for s in res["per_step"]])
            del res
        except BaseException as e:  # noqa: BLE001 - an OOM is the expected end of the probe
            if isinstance(e, KeyboardInterrupt):
                raise
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}",
                       oom="out of memory" in str(e).lower() or "OutOfMemory" in type(e).__name__)
            try:
                rec["memory"] = gc_.mem_peak(a.device)
            except Exception:  # noqa: BLE001
                pass
        last_s = rec["wall_s"] = time.perf_counter() - t0
        out.append(rec)
        mem = rec.get("memory", {}).get("peak_alloc_mb")
        log(f"probe/{framework} L={L}: {'ok' if rec['ok'] else 'FAILED ' + rec['error'][:200]} "
            f"({last_s:.0f}s, peak {gc_.fmt(mem)} MiB)")
        if not rec["ok"]:
            break
    fresh(a.device)
    return out


def longest(results: list[dict]):
    ok = [r["length"] for r in results if r.get("ok")]
    return max(ok) if ok else None


# ---------------------------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    m = res["meta"]
    dev = m["device_info"]
    lines = [f"# sftlab fast path vs TRL SFTTrainer: {dev.get('name')}", "",
             "Throughput: non-pad input tokens/s of synchronized step wall time after the first "
             f"{m['warmup']} steps. MFU (full FT): 6 N tok/s / {PEAK_TFLOPS:.0f} TFLOP/s, N = all params. "
             "Peak: torch.cuda.max_memory_allocated per run (MiB).", "",
             "| row | variant | tok/s | x TRL | peak MiB | mem / TRL | MFU | tok/step | first step s | graphs "
             "/ recompiles | loss first->last | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, runs in res["runs"].items():
        if row == "probe":
            continue
        trl = runs.get("trl", {})
        t_tok = trl.get("stats", {}).get("overall_tokens_per_s") if trl.get("ok") else None
        t_mem = trl.get("memory", {}).get("peak_net_mb") if trl.get("ok") else None
        t_note = ""
        if t_tok is None and row == "1b_full":
            t_tok, t_note = TRL_1B_ISSUE_TOK_S, "TRL ratio vs the issue's 17.4k tok/s (TRL not run here)"
        for variant, d in runs.items():
            if not d.get("ok"):
                why = "skipped: " + d.get("skipped") if d.get("skipped") else \
                    "FAILED: " + (d.get("error", "").strip().splitlines() or ["?"])[-1][:160]
                lines.append(f"| {row} | {variant} | - | - | - | - | - | - | - | - | - | {why} |")
                continue
            st, mem = d["stats"], d.get("memory", {})
            tok, pk = st.get("overall_tokens_per_s"), mem.get("peak_net_mb", mem.get("peak_rss_mb_process"))
            ls = [x for x in d.get("losses", []) if x is not None]
            c = d.get("compile") or {}
            lines.append(
                f"| {row} | {variant} | {gc_.fmt(tok)} | {gc_.fmt(tok / t_tok if tok and t_tok else None, '.2f')} "
                f"| {gc_.fmt(pk)} | {gc_.fmt(pk / t_mem if pk and t_mem else None, '.2f')} "
                f"| {gc_.fmt(d.get('mfu'), '.1%')} | {gc_.fmt(st.get('mean_tokens_per_step'))} "
                f"| {gc_.fmt(d.get('first_step_s'), '.1f')} "
                f"| {str(c.get('unique_graphs', '-')) + ' / ' + str(c.get('recompiles', '-')) if c else '-'} "
                f"| {f'{ls[0]:.2f}->{ls[-1]:.2f}' if ls else '-'} | {t_note if variant != 'trl' else ''} |")
    pr = res["runs"].get("probe", {})
    if pr:
        lines += ["", f"Longest sequence, 1B shape, full FT, batch 1 (gradient checkpointing "
                      f"{'off' if m['probe_no_gc'] else 'on'} on both sides; lengths tried "
                      f"{m['probe_lengths']}):", "", "| framework | longest ok | first failure | tried |",
                  "|---|---|---|---|"]
        for fw, runs in pr.items():
            if not isinstance(runs, list):
                lines.append(f"| {fw} | - | - | {runs.get('skipped') or runs.get('error', '')[:120]} |")
                continue
            fail = next((f"{r['length']}: {r.get('error', '')[:100]}" for r in runs if r.get("ok") is False), "-")
            tried = ", ".join(f"{r['length']}:{'ok' if r.get('ok') else 'skip' if r.get('ok') is None else 'fail'}"
                              f"({gc_.fmt(r.get('memory', {}).get('peak_alloc_mb'))} MiB)" for r in runs)
            lines.append(f"| {fw} | {gc_.fmt(longest(runs), 'd')} | {fail} | {tried} |")
    v = m["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v.get(k)}" for k in ("python", "torch", "transformers", "peft",
                                                                       "trl")),
              f"Total {m.get('total_s', 0):.0f}s. Command: `{' '.join(m['argv'])}`", ""]
    return "\n".join(lines)


def write(out: Path, res: dict) -> None:
    (out / "gpu_speed.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "gpu_speed.md").write_text(markdown(res))


# ---------------------------------------------------------------------------------------------- main

def prepare(a, work: Path) -> tuple[dict, dict, dict]:
    """Model folders and data files per workload (only those some planned run needs)."""
    wls, models, datas = workloads(a), {}, {}
    for key in sorted({r["workload"] for r in plan_runs(a)}):
        wl, t0 = wls[key], time.perf_counter()
        mdir = work / f"model_{key}"
        info = gc_.build_model_folder(mdir, a.tiny, a.seed, shape=wl["shape"], dtype=wl["dtype"], device=a.device)
        models[key] = {"dir": mdir, "params": info["params"], "info": info}
        n_packed = gc_.n_examples_needed(wl["steps"], wl["batch"], wl["min_tokens"], wl["max_length"],
                                         wl["max_length"])
        n_padded = (wl["steps"] + 2) * wl["batch"]
        packed, padded = work / f"chats_{key}_packed.jsonl", work / f"chats_{key}_padded.jsonl"
        stats = gc_.make_data(packed, mdir, max(n_packed, n_padded), wl["min_tokens"], wl["max_length"], a.seed)
        padded.write_text("".join(packed.read_text().splitlines(keepends=True)[:n_padded]))
        datas[key] = {"packed": packed, "padded": padded, "stats": stats}
        log(f"{key}: {info['params']:,} params, {stats['examples']} chats {stats['min']}-{stats['max']} tokens "
            f"({time.perf_counter() - t0:.1f}s)")
    return wls, models, datas


def main(argv=None) -> int:
    a = parse_args(argv)
    t_launch = time.perf_counter()
    for k, v in {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        os.environ.setdefault(k, v)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_speed_"))
    os.environ.setdefault("SFTLAB_CACHE", str(work / "sftlab_cache"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf_datasets_cache"))
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        log("CUDA requested but not available; use --device cpu --tiny for a CPU check")
        return 2
    res = {"meta": {"argv": sys.argv, "device_info": gc_.device_info(a.device), "versions": gc_.versions(),
                    "tiny": a.tiny, "warmup": a.warmup, "bucket": a.bucket, "trl_policy": a.trl_policy,
                    "probe_lengths": a.probe_lengths, "probe_no_gc": a.probe_no_gc, "budget_s": a.budget_s,
                    "peak_tflops": PEAK_TFLOPS, "trl_1b_issue_tok_s": TRL_1B_ISSUE_TOK_S}, "runs": {}}
    log(f"device: {res['meta']['device_info']}")
    log("versions: " + ", ".join(f"{k}={v}" for k, v in res["meta"]["versions"].items()))
    wls, models, datas = prepare(a, work)
    res["meta"].update(workloads={k: {kk: vv for kk, vv in w.items() if kk != "shape"} | {"params": models[k]["params"],
                                                                                             "data": datas[k]["stats"]}
                                  for k, w in wls.items() if k in models})
    write(out, res)
    took: dict = {}
    for r in plan_runs(a):
        row, variant = r["row"], r["variant"]
        slot = res["runs"].setdefault(row, {})
        elapsed = time.perf_counter() - t_launch
        if variant == "probe":
            budget = min(a.probe_budget_s, a.budget_s - elapsed)
            for i, fw in enumerate(("sftlab", "trl")):
                start = time.perf_counter()
                deadline = start + (budget / 2 if i == 0 else a.budget_s - (start - t_launch))
                deadline = min(deadline, t_launch + a.budget_s)
                if deadline - start < 10:
                    slot[fw] = {"skipped": "no time left in --budget-s"}
                    continue
                log(f"probe/{fw}: start (until +{deadline - start:.0f}s)")
                slot[fw] = probe(a, models["1b"], work, fw, deadline)
                write(out, res)
            continue
        key = r["key"]
        # estimate: the default, or what the same kind of run (workload, framework) took here, if longer
        est = max(r["estimate_s"], took.get((r["workload"], r["framework"]), 0.0))
        if elapsed + est > a.budget_s:
            log(f"{row}/{key}: skipped ({elapsed:.0f}s + estimate {est:.0f}s > budget {a.budget_s:.0f}s)")
            slot[key] = {"ok": False, "skipped": "not within --budget-s"}
            write(out, res)
            continue
        log(f"{row}/{key}: start")
        t0 = time.perf_counter()
        try:
            rec = one_run(a, r, wls[r["workload"]], models[r["workload"]], datas[r["workload"]], work)
            st = rec["stats"]
            log(f"{row}/{key}: {gc_.fmt(st.get('overall_tokens_per_s'))} tok/s, "
                f"{gc_.fmt(st.get('mean_tokens_per_step'))} tok/step, peak "
                f"{gc_.fmt(rec['memory'].get('peak_net_mb', rec['memory'].get('peak_rss_mb_process')))} MiB, "
                f"mfu {gc_.fmt(rec.get('mfu'), '.1%')}, first step {gc_.fmt(rec.get('first_step_s'), '.1f')}s, "
                f"compile {rec.get('compile')}")
        except BaseException as e:  # noqa: BLE001 - one failed run must not lose the others
            if isinstance(e, KeyboardInterrupt):
                raise
            rec = {"ok": False, "error": traceback.format_exc()[-6000:]}
            log(f"{row}/{key}: FAILED: {type(e).__name__}: {str(e)[:500]}")
            traceback.print_exc()
        rec["wall_s"] = time.perf_counter() - t0
        took[(r["workload"], r["framework"])] = rec["wall_s"]
        slot[key] = rec
        write(out, res)
        fresh(a.device)
    res["meta"]["total_s"] = time.perf_counter() - t_launch
    write(out, res)
    print(markdown(res), flush=True)
    if not a.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    runs = [d for row, rr in res["runs"].items() if row != "probe" for d in rr.values()]
    failed = [d for d in runs if d.get("ok") is False and not d.get("skipped")]
    log(f"done in {res['meta']['total_s']:.0f}s: {len(runs) - len(failed)}/{len(runs)} runs not failed; "
        f"wrote {out}/gpu_speed.json and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
