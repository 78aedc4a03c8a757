"""Shared pieces of the CPU benchmark: the workload, the statistics and the machine description.

Imported by trl_run.py, sftlab_run.py and compare.py (run as scripts from the repo root, so this
folder is on sys.path). Nothing here imports torch or sftlab at module level.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import sys
from pathlib import Path

WARMUP_STEPS = 2  # steps 1..WARMUP_STEPS are discarded from every statistic
DEFAULT_MODEL_FALLBACK = "/tmp/smol"
REPO_ROOT = Path(__file__).resolve().parent.parent


def add_run_args(p) -> None:
    """The arguments every single-run benchmark script takes (trl_run.py, sftlab_run.py)."""
    p.add_argument("--model", default=None, help="safetensors model folder (default: sftlab's embedded SmolLM2)")
    p.add_argument("--data", required=True, help="JSONL of {'messages': [...]} chats")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--policy", choices=["padded", "packed"], default="padded")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="result JSON")


def default_model() -> str:
    """sftlab's embedded SmolLM2-135M-Instruct as a safetensors folder, else /tmp/smol."""
    try:
        from sftlab.models import ensure_default_model

        return str(ensure_default_model())
    except Exception as e:  # noqa: BLE001 - sftlab may be mid-rewrite; the fallback is the same model
        print(f"[bench] sftlab.models.ensure_default_model() unavailable ({type(e).__name__}: {e}); "
              f"using {DEFAULT_MODEL_FALLBACK}", file=sys.stderr)
        return DEFAULT_MODEL_FALLBACK


def child_env(threads: int) -> dict:
    """Environment for a measured child: same thread caps for both frameworks, no tokenizer fork threads."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
    })
    return env


def children_peak_rss_mb() -> float:
    """Peak RSS of the largest waited-for descendant (Linux: ru_maxrss is in KiB).

    Only meaningful in a process that has run exactly one measured child, which is how both
    runner scripts use it.
    """
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# statistics


def summarize(per_step: list[dict], warmup: int = WARMUP_STEPS) -> dict:
    """per_step: dicts with `step` (1-based), `tokens` (non-pad input tokens) and `step_time` (s).

    Returns the median over steps > warmup of tokens/step_time, and the overall rate
    (sum tokens / sum time) over the same steps.
    """
    kept = [s for s in per_step if s["step"] > warmup and s.get("step_time", 0) > 0]
    if not kept:
        return {"measured_steps": 0, "median_tokens_per_s": None, "overall_tokens_per_s": None,
                "median_step_time": None, "mean_tokens_per_step": None}
    rates = [s["tokens"] / s["step_time"] for s in kept]
    total_tokens = sum(s["tokens"] for s in kept)
    total_time = sum(s["step_time"] for s in kept)
    return {
        "measured_steps": len(kept),
        "median_tokens_per_s": statistics.median(rates),
        "overall_tokens_per_s": total_tokens / total_time,
        "median_step_time": statistics.median(s["step_time"] for s in kept),
        "mean_tokens_per_step": total_tokens / len(kept),
    }


# ---------------------------------------------------------------------------------------------
# workload


def chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot_corpus is not installed (it provides the benchmark's chat data)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


def _qa_pairs_by_file() -> list[tuple[str, list[tuple[str, str]]]]:
    import yaml

    out = []
    for f in sorted(glob.glob(str(chatterbot_dir() / "*.yml"))):
        with open(f, encoding="utf-8") as fh:
            d = yaml.safe_load(fh) or {}
        pairs = []
        for conv in d.get("conversations") or []:
            conv = [str(u).strip() for u in conv if u is not None and str(u).strip()]
            # a conversation alternates user / assistant: [q, a, q, a, ...]; a trailing q is dropped
            for i in range(0, len(conv) - 1, 2):
                pairs.append((conv[i], conv[i + 1]))
        if pairs:
            out.append((Path(f).stem, pairs))
    return out


def make_workload(path: str | Path, model: str, n: int = 800, seed: int = 0, min_tokens: int = 30,
                  max_tokens: int = 300) -> dict:
    """Write `n` deterministic multi-turn chats to `path` (JSONL, {"messages": [...]}).

    Each example draws a target length uniformly in [min_tokens, max_tokens] (tokens of the chat
    rendered with the model's chat template, system prompt included) and concatenates consecutive
    Q/A pairs of one chatterbot topic file until it reaches the target. Returns length stats.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    files = _qa_pairs_by_file()
    rng = random.Random(seed)
    weights = [len(p) for _, p in files]
    lengths = []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            _, pairs = rng.choices(files, weights=weights, k=1)[0]
            target = rng.randint(min_tokens, max_tokens)
            i = rng.randrange(len(pairs))
            messages: list[dict] = []
            length = 0
            for _turn in range(len(pairs)):
                q, a = pairs[i % len(pairs)]
                cand = messages + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                cand_len = len(tok.apply_chat_template(cand, tokenize=True, return_dict=True)["input_ids"])
                if messages and cand_len > max_tokens:
                    break
                messages, length = cand, cand_len
                i += 1
                if length >= target:
                    break
            lengths.append(length)
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    lengths.sort()
    return {"path": str(path), "examples": n, "seed": seed, "min": lengths[0], "max": lengths[-1],
            "mean": sum(lengths) / n, "median": statistics.median(lengths)}


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ---------------------------------------------------------------------------------------------
# machine


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    try:
        from importlib.metadata import version

        versions["sftlab"] = version("sftlab")
    except Exception:  # noqa: BLE001
        versions["sftlab"] = None
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
            "platform": platform.platform(), "versions": versions}
