"""The model card every export carries: README.md with Hub front matter, and frontier.svg beside it.

It replaces the blank template PEFT writes ("[More Information Needed]" throughout, base_model a local cache
path). The first screen says what was learned *and* what was forgotten: task and retention scores with their
95% CIs at the base, the exported point and the final step. Then: base model and license, method and shape,
data files with hashes, steps, the rule that chose the point, every scored checkpoint, the frontier plot, the
command that reproduces the run and how to run the export.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SftlabError

# Models sftlab converts from a GGUF file it ships or fetches: where they come from on the Hub.
ORIGINS = {"smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
           "gemma3-270m": ("google/gemma-3-270m", "gemma")}
PLOT = "frontier.svg"


@dataclass
class Origin:
    """Where the base model comes from, as a reader (and the Hub) should see it: never a local cache path."""

    hub_id: str = ""  # front matter base_model, when known
    license: str = ""
    gguf: str = ""  # the GGUF file it was converted from, if any
    described: str = ""  # one line for the card


def base_origin(provenance: dict) -> Origin:
    base = provenance.get("base_model") or {}
    spec, source, loc = base.get("spec", ""), base.get("source", ""), base.get("location", "")
    src = Path(loc) / "sftlab_source.json" if loc else None
    gguf = json.loads(src.read_text()).get("gguf", "") if src and src.is_file() else ""
    lic = ""
    if gguf and Path(gguf).is_file():
        from .gguf import read_meta

        lic = str(read_meta(gguf, ("general.license",)).get("general.license", ""))
    if spec in ORIGINS:
        hub, known_lic = ORIGINS[spec]
        return Origin(hub, lic or known_lic, Path(gguf).name if gguf else "",
                      f"{hub} (sftlab's `{spec}`, converted from {Path(gguf).name or 'its GGUF file'})")
    if source == "hub":
        return Origin(spec, lic, "", spec)
    if gguf:
        return Origin("", lic, Path(gguf).name, f"the GGUF file {Path(gguf).name}")
    cfg = Path(spec) / "config.json"
    name = json.loads(cfg.read_text()).get("_name_or_path", "") if cfg.is_file() else ""
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return Origin(name, lic, "", f"{name} (a local copy: {Path(spec).name})")
    return Origin("", lic, "", f"a local model folder, {Path(spec).name} (sha256 {base.get('sha256', '')[:12]}…)")


@dataclass
class ExportInfo:
    """What was exported: the point, how it was chosen, and the form."""

    step: int
    alpha: float | None = None
    rule: str = ""  # e.g. "select: {max_kl: 0.1}" when the selection rule chose the point
    reason: str = ""
    form: str = "adapter"  # adapter | merged | gguf
    quant: str = ""
    files: list[str] = field(default_factory=list)


def _ci(s: dict | None) -> str:
    if not s:
        return "not scored"
    v, lo, hi = s.get("value"), s.get("ci_low"), s.get("ci_high")
    if v is None or not math.isfinite(v):
        return "not finite"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.4g}"
    return f"{v:.4g} [{lo:.4g}, {hi:.4g}]"


def _direction(s: dict | None) -> str:
    return "" if not s else " (higher is better)" if s.get("higher_is_better", True) else " (lower is better)"


def score_table(entries: list[dict], names: list[str], steps: list[tuple[str, int]]) -> list[str]:
    by_step = {e["step"]: e.get("scores", {}) for e in entries}
    head = "| score (95% CI) | " + " | ".join(label for label, _ in steps) + " |"
    rows = [head, "|---" * (len(steps) + 1) + "|"]
    for n in names:
        kind = next((by_step[s][n].get("kind", "task") for _, s in steps if n in by_step.get(s, {})), "task")
        sample = next((by_step[s][n] for _, s in steps if n in by_step.get(s, {})), None)
        rows.append(f"| {kind}: {n}{_direction(sample)} | "
                    + " | ".join(_ci(by_step.get(s, {}).get(n)) for _, s in steps) + " |")
    return rows


def _cost_line(entries: list[dict], retention: str, step: int) -> str:
    by_step = {e["step"]: e.get("scores", {}) for e in entries}
    base, at = by_step.get(0, {}).get(retention), by_step.get(step, {}).get(retention)
    if not (base and at):
        return (f"**Retention cost:** not measured at step {step} (no {retention} score at the base and at this "
                "point); score it with `sftlab eval RUN` before trusting this model on what the base knew.")
    delta = at["value"] - base["value"]
    worse = delta < 0 if at.get("higher_is_better", True) else delta > 0
    verdict = "worse than the base: this is what fine-tuning cost" if worse and delta else "no loss against the base"
    return (f"**Retention cost:** {retention} went from {_ci(base)} at the base to {_ci(at)} at the exported "
            f"point ({delta:+.4g}; {verdict}).")


def _front_matter(origin: Origin, method: str, info: ExportInfo) -> str:
    lines = ["---"]
    if origin.hub_id:
        lines.append(f"base_model: {origin.hub_id}")
    if origin.license:
        lines.append(f"license: {origin.license}")
    lib = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[info.form]
    lines += [f"library_name: {lib}", "pipeline_tag: text-generation", "tags:", "- sftlab", f"- {method}"]
    if info.form == "gguf":
        lines += ["- gguf", "- llama.cpp", "- ollama"]
    return "\n".join(lines + ["---", ""])


def _method_line(cfg: dict, prov: dict) -> str:
    m = dict(cfg.get("method") or {})
    name = m.pop("name", "?")
    shape = ", ".join(f"{k}={v}" for k, v in m.items() if v not in (None, [], {}, ""))
    params = prov.get("trainable_params")
    share = prov.get("trainable_share")
    count = (f"; {params:,} trainable parameters" + (f" ({100 * share:.3g}% of {prov.get('total_params', 0):,})"
             if share is not None else "")) if params else ""
    return f"{name}" + (f" ({shape})" if shape else "") + count


def render_card(run, info: ExportInfo, task: str | None, retention: str | None, plot: bool) -> str:
    """The README.md text (run: runs.Run; task/retention: the score names on the plane, None if unscored)."""
    import yaml

    entries, prov = run.trajectory(), run.provenance
    cfg = yaml.safe_load((run.dir / "config.yaml").read_text())
    origin = base_origin(prov)
    saved = [e["step"] for e in entries if e.get("path")]
    final = max(saved) if saved else info.step
    at = f"step {info.step}" + (f" at alpha {info.alpha:g}" if info.alpha not in (None, 1.0) else "")
    title = f"# {run.dir.name}: {cfg.get('method', {}).get('name', '?')} fine-tune of {origin.hub_id or origin.described}"
    out = [_front_matter(origin, run.method.name, info), title, ""]
    if task and retention:
        steps = [("base (step 0)", 0), (f"exported (step {info.step})", info.step)]
        steps += [(f"final (step {final})", final)] if final != info.step else []
        out += [f"What it learned and what it forgot, at the exported point ({at}) against the base and the "
                "final checkpoint:", "", *score_table(entries, [task, retention], steps), "",
                _cost_line(entries, retention, info.step), ""]
        if info.alpha not in (None, 1.0):
            out += [f"The exported weights are the base plus {info.alpha:g} of step {info.step}'s update; the "
                    "scores shown are the checkpoint's (alpha 1) unless `sftlab rewind --search` scored them.", ""]
    else:
        out += ["**Not scored:** this run has no task and retention scores, so nothing here says what it forgot. "
                "Add probes and run `sftlab eval RUN`, then export again.", ""]
    chosen = (f"chosen by {info.rule}: {info.reason}" if info.rule else
              "given on the command line" if info.step != final else "the last checkpoint")
    out += ["## Model", "", f"- **Base model:** {origin.described}",
            f"- **License:** {origin.license or 'see the base model'}",
            f"- **Method:** {_method_line(cfg, prov)}",
            f"- **Exported point:** {at} of {final} ({chosen})",
            f"- **Form:** {info.form}" + (f", {info.quant}" if info.quant else "")
            + (f" ({', '.join(info.files)})" if info.files else ""), ""]
    out += _data_section(cfg, prov) + _all_scores(entries, task, retention)
    if plot:
        out += ["## The frontier", "", f"![task against retention at every scored checkpoint]({PLOT})", "",
                "Each point a scored checkpoint (step 0 the base), up and right better on both axes; thick line "
                "the Pareto frontier, dashed ring the point the run's rule recommends; whiskers 95% CIs.", ""]
    out += _reproduce(run, cfg, prov) + _usage(info)
    return "\n".join(out).rstrip() + "\n"


def _data_section(cfg: dict, prov: dict) -> list[str]:
    data = prov.get("data") or {}
    rows = ["## Data and training", "", "| file | role | sha256 |", "|---|---|---|"]
    for role in ("train", "eval"):
        rows += [f"| {Path(d.get('path', '')).name} | {role} | {d.get('sha256') or d.get('kind', '')} |"
                 for d in data.get(role) or []]
    tr = cfg.get("train") or {}
    stats = ", ".join(f"{k} {data[k]}" for k in ("examples", "tokens", "trained_tokens") if k in data)
    rows += ["", f"{tr.get('steps', '?')} steps, batch {tr.get('batch_size', '?')}, learning rate "
             f"{tr.get('lr', '?')}, checkpoints every {(cfg.get('checkpoint') or {}).get('every', '?')} steps"
             + (f"; {stats}" if stats else "") + ".", ""]
    return rows


def _all_scores(entries: list[dict], task: str | None, retention: str | None) -> list[str]:
    names = [n for n in (task, retention) if n]
    others = sorted({n for e in entries for n in e.get("scores", {})} - set(names))
    scored = [e["step"] for e in entries if e.get("scores")]
    return _transposed(entries, names + others, scored) if scored else []


def _transposed(entries: list[dict], names: list[str], scored: list[int]) -> list[str]:
    by_step = {e["step"]: e.get("scores", {}) for e in entries}
    rows = ["## Every scored checkpoint", "", "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows += [f"| {s} | " + " | ".join(_ci(by_step[s].get(n)) for n in names) + " |" for s in scored]
    return rows + [""]


def _reproduce(run, cfg: dict, prov: dict) -> list[str]:
    cmd = " ".join(prov.get("command") or []) or "sftlab train config.yaml"
    return ["## Reproduce", "", "The run's resolved config is `sftlab_config.yaml` in this folder:", "", "```bash",
            "sftlab train sftlab_config.yaml", "```", "", f"(the original command: `{cmd}`; sftlab commit "
            f"{prov.get('sftlab_commit') or 'unknown'}; config hash {prov.get('config_hash', '')[:12]})", ""]


def _usage(info: ExportInfo) -> list[str]:
    if info.form == "gguf":
        g = info.files[0] if info.files else "model.gguf"
        return ["## Run it", "", "```bash", "ollama create my-model -f Modelfile && ollama run my-model",
                f"llama-cli -m {g} -cnv   # llama.cpp", "```", ""]
    if info.form == "adapter":
        return ["## Run it", "", "```python", "from peft import AutoPeftModelForCausalLM",
                "model = AutoPeftModelForCausalLM.from_pretrained('THIS_FOLDER')", "```", ""]
    return ["## Run it", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')", "```", ""]


def frontier_svg(run_dir: Path) -> str | None:
    """The report's task-vs-retention plane as a standalone SVG file (its CSS inlined), or None if unscored."""
    from ..report.load import load
    from ..report.plane import all_points, plane_svg

    try:
        data = load(run_dir)
    except SftlabError:
        return None
    groups = all_points(data)
    if not any(ps for _, ps in groups):
        return None
    svg = plane_svg(data, groups).split("</svg>")[0] + "</svg>"
    style = ("<style>text{font-family:sans-serif}.plotbox{fill:#fff;stroke:#ccc}.grid{stroke:#eef0f3}"
             ".tick{font-size:11px;fill:#666}.axis-title{font-size:12px}.path{fill:none;stroke-width:1.2;"
             "opacity:.45}.frontier{fill:none;stroke-width:3;opacity:.85}.front-ring{fill:none;stroke-width:1.5}"
             ".ci line{stroke-width:1;opacity:.5}.pt{stroke:#fff;stroke-width:1}.steplabel{font-size:10px;"
             "fill:#666}.choice{fill:none;stroke:#000;stroke-width:1.5;stroke-dasharray:4 3}</style>")
    head, rest = svg.split(">", 1)
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{head}>{style}{rest}\n'


def write_card(folder: Path, run, info: ExportInfo) -> None:
    """README.md, frontier.svg and sftlab_config.yaml into `folder` (an export being written)."""
    import shutil

    from ..rewinding import pick_scores

    try:
        task, retention = pick_scores(run.trajectory(), None, None)
    except SftlabError:
        task = retention = None
    svg = frontier_svg(run.dir) if task else None
    if svg:
        (folder / PLOT).write_text(svg, encoding="utf-8")
    shutil.copy(run.dir / "config.yaml", folder / "sftlab_config.yaml")
    (folder / "README.md").write_text(render_card(run, info, task, retention, bool(svg)), encoding="utf-8")
