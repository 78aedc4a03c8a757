"""Re-score the writing-quality example's points (base, dpo_a step 24, dpo_b step 30) with readability, actionability
and `variety` (greedy answers to the 32 test questions), after `make quality-example` (docs/writing-quality.md):

    OMP_NUM_THREADS=1 python examples/quality_variety.py      # ~1 min a point on one core; writes quality_variety.json
"""
import json
from pathlib import Path

from sftlab.compare import paired_change
from sftlab.probes import build_probe
from sftlab.probes.base import ProbeContext
from sftlab.runs import Run
root = Path(__file__).resolve().parents[1]
points = [("base", "runs/pipeline_quality_smollm2/sft", 0), ("dpo_a:24", "runs/pipeline_quality_smollm2/dpo_a", 24),
          ("dpo_b:30", "runs/pipeline_quality_smollm2/dpo_b", 30)]
probe = build_probe("quality", {"path": str(root / "examples/data/quality_prompts_test.jsonl"), "max_new_tokens": 112,
                                "metric": "readability", "dimensions": ["readability", "actionability", "variety"]})
ctx = ProbeContext(device="cpu", batch_size=8, cache_dir=root / "runs" / "quality_variety_cache", base_id="x", n_boot=2000)
out = {}
for name, run, step in points:
    r = Run(root / run)
    model, tok = (r.load_initial(), r.tokenizer()) if step == 0 else r.load(step)
    s = probe.score(model.eval(), tok, ctx)
    d = s.extra["dimensions"]
    out[name] = {k: (v["mean"], v.get("ci")) for k, v in d.items()}
    out[name]["per_answer_variety"] = s.extra["per_answer"]["values"]["variety"]
    print(name, {k: v for k, v in out[name].items() if k != "per_answer_variety"}, flush=True)

base = out["base"]["per_answer_variety"]
for name in ("dpo_a:24", "dpo_b:30"):
    c = paired_change(base, out[name]["per_answer_variety"])  # as sftlab compare computes it
    print(name, "variety change vs base %.3f [%.3f, %.3f]" % (c["change"], c["ci_low"], c["ci_high"]))
(root / "runs").mkdir(exist_ok=True)
json.dump(out, open(root / "runs" / "quality_variety.json", "w"))
