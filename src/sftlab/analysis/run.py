"""`sftlab analyze`: weight-space and activation-space geometry of a run's checkpoints, into RUN/analysis/.

The fine-tuned weights come from the same merge path rewinding uses (`Run.load(step, merge=True)`, which
`sftlab.interpolate` builds on): PEFT's merge_and_unload for LoRA/DoRA/IA3 (additive) and OFT/BOFT (the
rotation multiplied in), the saved weights for full fine-tuning. So dW is whatever the method really does
to W, never a re-derivation of it. Prefix and prompt tuning change no weight: their weights file says so
and only activations are compared (the PEFT model, virtual tokens dropped from the outputs).

The base model is loaded once, and its SVDs (`weights.SVDCache`) and its activations on the prompt sets
are computed once per call and reused for every step. The schema of the files is in `sftlab.analysis`.
"""

from __future__ import annotations

import json
import os
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SftlabError
from . import activations as act
from . import weights as wts

SCHEMA = 1


@dataclass
class AnalyzeOptions:
    steps: str = "last"  # "last" | "all" | "4,8"
    activations: bool = True
    layers: str = "auto"  # "auto" (4 evenly spaced) | "all" | "0,5,10"
    points: tuple[str, ...] = ("block", "attn", "mlp")
    n_texts: int = 16
    max_length: int = 128
    batch_size: int = 8
    k: int = 10  # intruders: top-k singular vectors of Wft
    eps: float = 0.5  # intruders: max |cos| below this
    max_points: int = 64  # spectra kept per module in the JSON
    progress: bool = True


def resolve_steps(run, spec: str) -> list[int]:
    have = [e["step"] for e in run.checkpoints()]
    if not have:
        raise SftlabError(f"{run.dir}: no complete checkpoint to analyse yet")
    if spec in ("", "last"):
        return [have[-1]]
    if spec == "all":
        return have
    try:
        want = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SftlabError(f"--steps: expected last, all or a comma list like 4,8; got {spec!r}") from None
    missing = [s for s in want if s not in have]
    if missing:
        raise SftlabError(f"--steps: no checkpoint at step(s) {missing}; have {have}")
    return want


def choose_layers(n_layers: int, spec: str) -> list[int]:
    if spec == "all":
        return list(range(n_layers))
    if spec in ("", "auto"):
        k = min(4, n_layers)
        return sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})
    try:
        layers = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise SftlabError(f"--layers: expected auto, all or a comma list like 0,5,10; got {spec!r}") from None
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise SftlabError(f"--layers: {bad} out of range; the model has layers 0..{n_layers - 1}")
    return layers


def layer_of(name: str) -> int | None:
    import re

    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def linear_names(model) -> list[str]:
    """Every nn.Linear but the output head (tied to the embeddings in most small models; no method here
    adapts it by default, and its vocab x d SVD would cost more than all decoder layers together)."""
    import torch

    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


# ---- prompt sets ------------------------------------------------------------------------------------

def task_texts(run, tokenizer, n: int) -> tuple[list[str], str]:
    """(up to n rendered prompts, their file) from the run's task probes, else its eval data, else its train
    data; ([], why) when none of those files can be read from here."""
    from ..probes.texts import prompt_messages, read_rows, render_prompt

    cands = [p.options.path for p in run.cfg.probes
             if getattr(p.options, "path", "") and getattr(p.options, "kind", "task") == "task"]
    cands += [s.path for s in run.cfg.data.eval] + [s.path for s in run.cfg.data.train]
    for path in cands:
        if not Path(path).expanduser().is_file():
            continue
        texts = []
        for place, row in read_rows(path, "analyze task prompts"):
            try:
                texts.append(render_prompt(tokenizer, prompt_messages(row, place), run.cfg.data.template))
            except SftlabError:
                continue  # a row without a prompt (e.g. plain text): not a task prompt
            if len(texts) == n:
                break
        if texts:
            return texts, path
    return [], f"none of the run's data files is readable from {os.getcwd()}: {cands}"


# ---- one step ---------------------------------------------------------------------------------------

def load_tuned(run, step: int):
    """(model, has merged weights): merged HF model for weight-changing methods, the PEFT model otherwise."""
    merge = run.method.merge is not None
    model, _ = run.load(step, merge=merge)
    model.eval()
    return model, merge


def weight_section(base, tuned, names: list[str], cache: wts.SVDCache, opts: AnalyzeOptions,
                   rotation: bool, bar=None) -> dict[str, dict]:
    """{module name: module_metrics} for every linear module of the base."""
    b, t = dict(base.named_modules()), dict(tuned.named_modules())
    out = {}
    for name in names:
        if name not in t:
            raise SftlabError(f"the tuned model has no module {name!r}; is the checkpoint for this base model?")
        w0, wft = b[name].weight, t[name].weight
        m = wts.module_metrics(w0, wft, cache.get(name, w0), opts.k, opts.eps, rotation,
                               max_points=opts.max_points)
        m["layer"] = layer_of(name)
        out[name] = m
        if bar is not None:
            bar.update(1)
    return out


def activation_section(base, tuned, tokenizer, sets: dict[str, list[str]], layers: list[int],
                       opts: AnalyzeOptions, changed: list[str]) -> dict:
    """Per prompt set: per layer and point, `act.compare` of base vs tuned outputs; plus update responses."""
    bl, tl = act.decoder_layers(base), act.decoder_layers(tuned)
    bpoints = {f"{i}.{p}": bl[i] + act.POINTS[p] for i in layers for p in opts.points}
    tpoints = {f"{i}.{p}": tl[i] + act.POINTS[p] for i in layers for p in opts.points}
    tuned_w = dict(tuned.named_modules())
    out: dict = {}
    for set_name, texts in sets.items():
        if not texts:
            continue
        resp = act.UpdateResponse({n: tuned_w[n].weight for n in changed})
        x0 = act.capture(base, tokenizer, texts, bpoints, opts.max_length, opts.batch_size, resp, changed)
        x1 = act.capture(tuned, tokenizer, texts, tpoints, opts.max_length, opts.batch_size)
        per_layer: dict[str, dict] = {}
        for key in bpoints:
            layer, point = key.split(".")
            per_layer.setdefault(layer, {})[point] = act.compare(x0[key], x1[key])
        ratios = resp.ratios()
        resp_layers: dict[str, list[float]] = {}
        for n, r in ratios.items():
            if layer_of(n) is not None:
                resp_layers.setdefault(str(layer_of(n)), []).append(r)
        out[set_name] = {"texts": len(texts), "tokens": int(next(iter(x0.values())).shape[0]) if x0 else 0,
                         "layers": per_layer, "response": ratios,
                         "response_per_layer": {k: sum(v) / len(v) for k, v in
                                                sorted(resp_layers.items(), key=lambda kv: int(kv[0]))}}
    return out


def changed_linears(base, tuned, names: list[str]) -> list[str]:
    import torch

    b, t = dict(base.named_modules()), dict(tuned.named_modules())
    return [n for n in names if n in t and not torch.equal(b[n].weight, t[n].weight)]


# ---- aggregation and files --------------------------------------------------------------------------

def activation_summary(section: dict) -> dict:
    """Per set: means over layers of the 'block' point (or the first point) and the per-layer values."""
    out = {}
    for set_name, s in section.items():
        per_layer = {}
        for layer, pts in s["layers"].items():
            point = "block" if "block" in pts else next(iter(pts))
            per_layer[layer] = {k: pts[point][k] for k in act.ACT_KEYS if pts[point].get(k) is not None}
        mean = {}
        for k in act.ACT_KEYS:
            vals = [v[k] for v in per_layer.values() if k in v]
            if vals:
                mean[k] = sum(vals) / len(vals)
        resp = list(s["response"].values())
        if resp:
            mean["update_response"] = sum(resp) / len(resp)
        out[set_name] = {"mean": mean, "per_layer": per_layer, "response_per_layer": s["response_per_layer"]}
    return out


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, allow_nan=False))
    os.replace(tmp, path)


def finite(x):
    """The same structure with NaN/inf floats as None (JSON has no NaN; a plot skips a null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def step_scores(run) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for e in run.trajectory():
        for name, s in (e.get("scores") or {}).items():
            out.setdefault(e["step"], {})[name] = {"value": s.get("value"), "kind": s.get("kind"),
                                                   "higher_is_better": s.get("higher_is_better")}
    return out


def read_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if data.get("schema") == SCHEMA else {}
    except (OSError, ValueError):
        return {}


def analyze_step(run, step: int, base, tok, names: list[str], cache: wts.SVDCache, opts: AnalyzeOptions,
                 sets: dict[str, list[str]], layers: list[int], task_src: str, out_dir: Path, bar) -> dict:
    """Write one checkpoint's weights (and activations) file; return its summary entry."""
    import time

    t0 = time.perf_counter()
    tuned, merged = load_tuned(run, step)
    t1 = time.perf_counter()
    if merged:
        mods = weight_section(base, tuned, names, cache, opts, run.method.merge.rotation, bar)
        wsum = wts.aggregate(mods, layer_of)
        wfile = {"step": step, "method": run.method.name, "weight_change": True, "modules": mods}
    else:
        wsum = {"note": f"{run.method.name} adds virtual tokens and changes no weight"}
        wfile = {"step": step, "method": run.method.name, "weight_change": False, "note": wsum["note"],
                 "modules": {}}
    write_json(out_dir / f"weights-step-{step:06d}.json", wfile)
    t2 = time.perf_counter()
    entry = {"weights": wsum, "seconds": {"load": round(t1 - t0, 2), "weights": round(t2 - t1, 2)}}
    if opts.activations:
        changed = changed_linears(base, tuned, names) if merged else []
        section = activation_section(base, tuned, tok, sets, layers, opts, changed)
        write_json(out_dir / f"activations-step-{step:06d}.json",
                   {"step": step, "layers": layers, "points": list(opts.points), "task_source": task_src,
                    "sets": section})
        entry["activations"] = activation_summary(section)
        entry["seconds"]["activations"] = round(time.perf_counter() - t2, 2)
        bar.update(1)
    return entry


def analyze_run(run_dir: str | Path, opts: AnalyzeOptions | None = None) -> dict:
    """Analyse the chosen checkpoints of a run; write RUN/analysis/*.json; return the summary."""
    from tqdm.auto import tqdm

    from ..models import load_model
    from ..probes.texts import general_passages
    from ..runs import Run

    opts = opts or AnalyzeOptions()
    run = Run(run_dir)
    steps = resolve_steps(run, opts.steps)
    ref = run.base_ref()
    # A quantized run: W0 = its base dequantized (quantize.py), then float32 like every other base here.
    base = load_model(ref, run.cfg.model.dtype if run.cfg.quantization.enabled else "float32",
                      run.cfg.model.trust_remote_code, quant=run.cfg.quantization, dequantize=True).float()
    base.eval()
    tok = run.tokenizer()
    if run.cfg.model.new_tokens:  # W0 with the run's new-token rows: task texts may hold the new tokens
        from ..tokens import init_new_rows

        init_new_rows(base, tok, run.cfg.model, run.cfg.run.seed)
    names = linear_names(base)
    weight_change = run.method.merge is not None
    sets, task_src = {}, ""
    layers: list[int] = []
    if opts.activations:
        layers = choose_layers(len(act.decoder_layers(base)), opts.layers)
        task, task_src = task_texts(run, tok, opts.n_texts)
        sets = {"general": general_passages(opts.n_texts, seed=0), "task": task}
    cache = wts.SVDCache()
    out_dir = run.dir / "analysis"
    summary = read_summary(out_dir / "summary.json")
    settings = {k: v for k, v in asdict(opts).items() if k not in ("steps", "progress")}
    summary.update({"schema": SCHEMA, "run": str(run.dir), "method": run.method.name,
                    "base_model": ref.spec, "base_sha256": ref.sha256, "weight_change": weight_change,
                    "settings": {**settings, "layers_used": layers, "task_source": task_src}})
    summary.setdefault("steps", {})
    scores = step_scores(run)
    total = len(steps) * (len(names) if weight_change else 0) + len(steps) * int(opts.activations)
    bar = tqdm(total=total, desc="analyze", unit="module", disable=not opts.progress)
    for step in steps:
        entry = analyze_step(run, step, base, tok, names, cache, opts, sets, layers, task_src, out_dir, bar)
        old = summary["steps"].get(str(step), {})  # a --no-activations call keeps earlier activations
        summary["steps"][str(step)] = {**old, "step": step, "scores": scores.get(step, {}), **entry}
    bar.close()
    summary["steps"] = dict(sorted(summary["steps"].items(), key=lambda kv: int(kv[0])))
    write_json(out_dir / "summary.json", summary)
    return summary


def summary_table(summary: dict, steps: list[int] | None = None) -> str:
    """A short text table: per step, the first task and retention scores and the headline geometry."""
    rows = [("step", "task", "retention", "eff.rank", "intruders", "|dW|F/|W0|F", "drift gen", "CKA gen",
             "drift task", "resp gen")]

    def fmt(v, spec=".4g"):
        return "-" if v is None else format(v, spec)

    for key, e in summary.get("steps", {}).items():
        if steps is not None and int(key) not in steps:
            continue
        sc = e.get("scores", {})
        task = next((s["value"] for s in sc.values() if s.get("kind") == "task"), None)
        ret = next((s["value"] for s in sc.values() if s.get("kind") == "retention"), None)
        w = e.get("weights", {})
        a = e.get("activations", {})
        gen, tsk = a.get("general", {}).get("mean", {}), a.get("task", {}).get("mean", {})
        rows.append((key, fmt(task), fmt(ret), fmt(w.get("effective_rank"), ".3g"),
                     fmt(w.get("intruders"), ".0f"), fmt(w.get("rel_update_frob"), ".3g"),
                     fmt(gen.get("cosine_drift"), ".3g"), fmt(gen.get("cka"), ".4f"),
                     fmt(tsk.get("cosine_drift"), ".3g"), fmt(gen.get("update_response"), ".3g")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    if not summary.get("weight_change", True):
        lines.append(f"({summary.get('method')} changes no weight: activations only)")
    return "\n".join(lines)
