"""CPU benchmark: sftlab vs TRL's SFTTrainer on the same model, data, batch, steps and padding policy.

    .venv/bin/python benchmarks/compare.py                       # lora,full x padded,packed; 3 repeats
    .venv/bin/python benchmarks/compare.py --quick               # 1 repeat, 6 steps, no BENCHMARKS.md
    .venv/bin/python benchmarks/compare.py --methods lora --policies padded --repeats 2

For every (method, policy) it runs TRL and sftlab alternately (trl, sftlab, trl, sftlab, ...),
each in a fresh process (trl_run.py / sftlab_run.py), so slow drifts of the machine hit both.
Throughput is non-pad input tokens per second, median over the steps after the first two;
peak memory is the peak RSS of the training process. Raw results go to
benchmarks/results/cpu.json; the table goes to stdout and to BENCHMARKS.md, section
"CPU: sftlab vs TRL SFTTrainer".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

SECTION = "CPU: sftlab vs TRL SFTTrainer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="safetensors model folder (default: sftlab's embedded SmolLM2, "
                                                 "else /tmp/smol)")
    p.add_argument("--data", default=None, help="existing chat JSONL (default: generate from chatterbot_corpus)")
    p.add_argument("--examples", type=int, default=800, help="examples in the generated workload")
    p.add_argument("--methods", default="lora,full", help="comma list of lora, full")
    p.add_argument("--policies", default="padded,packed", help="comma list of padded, packed")
    p.add_argument("--repeats", type=int, default=3, help="runs per framework per row")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600, help="per run, seconds")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 repeat, 6 steps (unless given), results to results/cpu_quick.json, "
                        "BENCHMARKS.md untouched")
    p.add_argument("--workdir", default=None, help="where the workload and per-run JSON go (default: a temp dir)")
    p.add_argument("--results", default=None, help="raw JSON (default benchmarks/results/cpu.json)")
    p.add_argument("--md", default=str(common.REPO_ROOT / "BENCHMARKS.md"), help="markdown file to update")
    p.add_argument("--no-md", action="store_true", help="do not touch the markdown file")
    p.add_argument("--sftlab-cmd", default=None, help="passed to sftlab_run.py")
    args = p.parse_args(argv)
    explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--"))
    if args.quick:
        if "--repeats" not in explicit:
            args.repeats = 1
        if "--steps" not in explicit:
            args.steps = 6
        args.no_md = args.no_md or "--md" not in explicit
        if args.results is None:
            args.results = str(HERE / "results" / "cpu_quick.json")
    if args.results is None:
        args.results = str(HERE / "results" / "cpu.json")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.policies = [m.strip() for m in args.policies.split(",") if m.strip()]
    for m in args.methods:
        if m not in ("lora", "full"):
            p.error(f"--methods: unknown {m!r}")
    for m in args.policies:
        if m not in ("padded", "packed"):
            p.error(f"--policies: unknown {m!r}")
    if args.steps <= common.WARMUP_STEPS:
        p.error(f"--steps must be > {common.WARMUP_STEPS} (the first {common.WARMUP_STEPS} are warm-up)")
    return args


def run_one(framework: str, args, method: str, policy: str, out: Path) -> dict:
    script = HERE / ("trl_run.py" if framework == "trl" else "sftlab_run.py")
    cmd = [sys.executable, str(script), "--model", args.model, "--data", args.data, "--method", method,
           "--policy", policy, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--max-length", str(args.max_length), "--lr", str(args.lr), "--seed", str(args.seed),
           "--threads", str(args.threads), "--timeout", str(args.timeout), "--out", str(out)]
    if framework == "sftlab" and args.sftlab_cmd:
        cmd += ["--sftlab-cmd", args.sftlab_cmd]
    subprocess.run(cmd, env=common.child_env(args.threads))
    if out.exists():
        res = json.loads(out.read_text())
    else:
        res = {"framework": framework, "ok": False, "error": "runner wrote no result"}
    res.pop("log_tail", None)
    if not res.get("ok"):
        err = (res.get("error") or "").strip().splitlines()
        print(f"    {framework} failed: {err[-1] if err else '?'}", flush=True)
    return res


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize_row(runs: list[dict]) -> dict:
    trl = [r for r in runs if r["framework"] == "trl"]
    sft = [r for r in runs if r["framework"] == "sftlab"]

    def ok_val(rs, key):
        return [r.get(key) if r.get("ok") else None for r in rs]

    t_tps, s_tps = ok_val(trl, "median_tokens_per_s"), ok_val(sft, "median_tokens_per_s")
    t_mem, s_mem = ok_val(trl, "peak_rss_mb"), ok_val(sft, "peak_rss_mb")
    # ratios per interleaved pair, then the median over pairs
    tps_ratios = [s / t for t, s in zip(t_tps, s_tps) if t and s]
    mem_ratios = [s / t for t, s in zip(t_mem, s_mem) if t and s]
    return {
        "trl_tokens_per_s": _med(t_tps), "sftlab_tokens_per_s": _med(s_tps),
        "trl_tokens_per_s_all": t_tps, "sftlab_tokens_per_s_all": s_tps,
        "tokens_per_s_ratio": _med(tps_ratios),
        "trl_peak_rss_mb": _med(t_mem), "sftlab_peak_rss_mb": _med(s_mem),
        "peak_rss_ratio": _med(mem_ratios),
        "trl_tokens_per_step": _med(ok_val(trl, "mean_tokens_per_step")),
        "sftlab_tokens_per_step": _med(ok_val(sft, "mean_tokens_per_step")),
        "trl_ok": sum(1 for r in trl if r.get("ok")), "sftlab_ok": sum(1 for r in sft if r.get("ok")),
        "repeats": len(trl),
    }


def fmt(x, spec=".1f", none="n/a"):
    return none if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| method | policy | TRL tok/s | sftlab tok/s | sftlab/TRL tok/s | TRL peak RSS MB | "
            "sftlab peak RSS MB | sftlab/TRL RSS | tok/step TRL / sftlab | ok runs TRL / sftlab |")
    sep = "|" + "---|" * 10
    lines = [head, sep]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"| {r['method']} | {r['policy']} | {fmt(s['trl_tokens_per_s'])} | {fmt(s['sftlab_tokens_per_s'])} | "
            f"{fmt(s['tokens_per_s_ratio'], '.2f')}x | {fmt(s['trl_peak_rss_mb'], '.0f')} | "
            f"{fmt(s['sftlab_peak_rss_mb'], '.0f')} | {fmt(s['peak_rss_ratio'], '.2f')}x | "
            f"{fmt(s['trl_tokens_per_step'], '.0f')} / {fmt(s['sftlab_tokens_per_step'], '.0f')} | "
            f"{s['trl_ok']}/{s['repeats']} / {s['sftlab_ok']}/{s['repeats']} |")
    return "\n".join(lines)


def markdown_section(report: dict) -> str:
    m = report["machine"]
    v = m["versions"]
    a = report["settings"]
    w = report["workload"]
    return f"""## {SECTION}

- Date: {report['date']}
- Machine: {m['nproc']} CPUs ({m['affinity']} usable), {m['cpu']}; {m['platform']}
- Versions: torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}, trl {v.get('trl')}, \
sftlab {v.get('sftlab')}, Python {v.get('python')}
- Command: `{report['command']}`
- Model: `{report['model']}` (fp32, sdpa attention, {a['threads']} torch threads)
- Workload: {w.get('examples')} multi-turn chats built from chatterbot_corpus (seed {w.get('seed')}), \
{w.get('min')}..{w.get('max')} tokens (median {w.get('median')}); loss on every assistant turn
- Per run: batch {a['batch_size']}, {a['steps']} steps, max_length {a['max_length']}, lr {a['lr']}, \
{a['repeats']} repeats per framework, run alternately (TRL, sftlab, TRL, ...), each in a fresh process
- LoRA: r=16, alpha=32, dropout 0, all linear layers; full: every weight
- padded: rows padded to the batch's longest; packed: `batch` rows of up to max_length tokens holding several \
examples with per-example attention (TRL: `packing=True`, `packing_strategy="bfd"`, padding-free)
- tok/s: non-pad input tokens per second, median over steps {common.WARMUP_STEPS + 1}..{a['steps']} of each run, \
then the median over runs; sftlab/TRL columns are the median of per-pair ratios. Peak RSS: \
`getrusage(RUSAGE_CHILDREN).ru_maxrss` of the training process (its only child's parent measures it).
- Raw results: `benchmarks/results/{Path(report['results_file']).name}`

{report['table']}
"""


def update_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == f"## {SECTION}"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(new)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model is None:
        args.model = common.default_model()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sftlab_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = str(work / "chats.jsonl")
        workload = common.make_workload(args.data, args.model, n=args.examples, seed=args.seed)
    else:
        workload = {"path": args.data, "examples": len(common.read_jsonl(args.data)), "seed": None}
    print(f"[compare] workload {workload}", flush=True)
    command = shlex.join([Path(sys.executable).relative_to(common.REPO_ROOT).as_posix()
                          if Path(sys.executable).is_relative_to(common.REPO_ROOT) else sys.executable,
                          "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])

    rows = []
    for method in args.methods:
        for policy in args.policies:
            runs = []
            for rep in range(args.repeats):
                for fw in ("trl", "sftlab"):
                    print(f"[compare] {method}/{policy} repeat {rep + 1}/{args.repeats}: {fw}", flush=True)
                    res = run_one(fw, args, method, policy, work / f"{method}_{policy}_{rep}_{fw}.json")
                    res["repeat"] = rep
                    runs.append(res)
            rows.append({"method": method, "policy": policy, "summary": summarize_row(runs), "runs": runs})
            print(table(rows[-1:]), flush=True)

    tbl = table(rows)
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "command": command,
        "model": args.model,
        "workload": workload,
        "settings": {"batch_size": args.batch_size, "steps": args.steps, "max_length": args.max_length,
                     "lr": args.lr, "seed": args.seed, "threads": args.threads, "repeats": args.repeats,
                     "warmup_steps_discarded": common.WARMUP_STEPS},
        "results_file": args.results,
        "table": tbl,
        "rows": rows,
    }
    res_path = Path(args.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(report, indent=1))
    print("\n" + tbl)
    print(f"\n[compare] raw results: {res_path}")
    if not args.no_md:
        update_markdown(Path(args.md), markdown_section(report))
        print(f"[compare] updated {args.md} section '{SECTION}'")
    return 0 if all(r["summary"]["trl_ok"] and r["summary"]["sftlab_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
