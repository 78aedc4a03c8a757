"""Sample generations per checkpoint: what the model actually wrote, step by step.

Generation probes (generate, quality) keep a few outputs in `scores[name]["extra"]["samples"]`, a list of
{"source", "prompt", "reference"?, "output"}. The probes score a fixed seeded subset, so the same prompts
recur at every checkpoint: the section groups by prompt and lists each checkpoint's output under it, which
makes drift (and forgetting) visible by reading down a column.
"""

from __future__ import annotations

from .escape import esc
from .load import ReportData, RunData
from .sections import per_run, register_section, table

MAX_CHARS = 2000  # per shown text; the page stays small even with long generations


def clip(text) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + f" … [{len(text) - MAX_CHARS} more characters]"


def collect(r: RunData) -> dict[str, dict[tuple, dict]]:
    """probe name -> (source, prompt) -> {"prompt", "reference", "outputs": [(step, output)]}, first-seen order."""
    out: dict[str, dict[tuple, dict]] = {}
    for e in r.entries:
        for name, s in (e.get("scores") or {}).items():
            samples = ((s or {}).get("extra") or {}).get("samples") if isinstance(s, dict) else None
            if not isinstance(samples, list):
                continue
            for smp in samples:
                if not isinstance(smp, dict):
                    continue
                key = (str(smp.get("source")), str(smp.get("prompt")))
                slot = out.setdefault(name, {}).setdefault(
                    key, {"prompt": smp.get("prompt"), "reference": smp.get("reference"), "outputs": []})
                slot["outputs"].append((e.get("step"), smp.get("output")))
    return out


def run_samples(r: RunData) -> str | None:
    probes = collect(r)
    if not probes:
        return None
    parts = []
    for name, groups in probes.items():
        parts.append(f"<h3>{esc(name)}</h3>")
        for (source, _), g in groups.items():
            ref = (f'<div class="ref"><span class="dim">reference:</span> {esc(clip(g["reference"]))}</div>'
                   if g["reference"] is not None else "")
            rows = [[esc(step), f'<pre class="gen">{esc(clip(out))}</pre>'] for step, out in g["outputs"]]
            parts.append(f'<div class="sample"><div class="dim">{esc(source)}</div>'
                         f'<pre class="prompt">{esc(clip(g["prompt"]))}</pre>{ref}'
                         f'{table(["step", "output"], rows, "gens")}</div>')
    return "".join(parts)


def samples(data: ReportData) -> str | None:
    return per_run(data, run_samples)


register_section("samples", "Sample generations", samples, order=70)
