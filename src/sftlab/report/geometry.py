"""The report's geometry section: plots of RUN/analysis/*.json (written by `sftlab analyze`).

Along the trajectory: weight-space and activation-space summaries per analysed checkpoint, beside the task
and retention scores. Per layer: effective rank, intruders, activation drift (one line per step) and the
update response, i.e. where the change lives. Spectra: the retention view dP(i) and the adaptation view
E(i) of the most-changed modules at the last analysed step. Reads JSON only (no torch).
"""

from __future__ import annotations

from .escape import esc, finite, fmt
from .load import ReportData, RunData
from .sections import per_run, register_section, table
from .svg import Line, colours, legend, line_chart

SPECTRUM_MODULES = 4  # modules whose spectra are drawn (the largest relative updates)


def _steps(summary: dict) -> list[tuple[int, dict]]:
    out = []
    for k, v in (summary.get("steps") or {}).items():
        try:
            out.append((int(k), v))
        except (TypeError, ValueError):
            continue
    return sorted(out, key=lambda kv: kv[0])


def _first_score(scores: dict, kind: str):
    return next((s.get("value") for s in scores.values() if isinstance(s, dict) and s.get("kind") == kind), None)


def _first_name(steps: list[tuple[int, dict]], kind: str) -> str:
    for _, e in steps:
        for name, s in (e.get("scores") or {}).items():
            if isinstance(s, dict) and s.get("kind") == kind:
                return f"{kind} ({name})"
    return kind


def _table(steps: list[tuple[int, dict]]) -> str:
    head = ["step", _first_name(steps, "task"), _first_name(steps, "retention"), "effective rank",
            "90% energy rank", "intruders", "‖dW‖F/‖W0‖F", "dP smoothness", "drift (general)", "CKA (general)",
            "drift (task)", "update response"]
    rows = []
    for step, e in steps:
        w, a = e.get("weights") or {}, e.get("activations") or {}
        gen, task = (a.get("general") or {}).get("mean") or {}, (a.get("task") or {}).get("mean") or {}
        sc = e.get("scores") or {}
        cells = [step, _first_score(sc, "task"), _first_score(sc, "retention"), w.get("effective_rank"),
                 w.get("energy90_rank"), w.get("intruders"), w.get("rel_update_frob"), w.get("dp_smoothness"),
                 gen.get("cosine_drift"), gen.get("cka"), task.get("cosine_drift"), gen.get("update_response")]
        rows.append([esc(fmt(c)) for c in cells])
    return table([esc(h) for h in head], rows, "num")


def _along_steps(steps: list[tuple[int, dict]]) -> str:
    """Cosine drift (general, task) and relative update size along the steps."""
    series = {"drift (general text)": [], "drift (task prompts)": [], "‖dW‖F/‖W0‖F": []}
    for step, e in steps:
        a = e.get("activations") or {}
        for name, set_name in (("drift (general text)", "general"), ("drift (task prompts)", "task")):
            v = ((a.get(set_name) or {}).get("mean") or {}).get("cosine_drift")
            if finite(v):
                series[name].append((float(step), float(v)))
        v = (e.get("weights") or {}).get("rel_update_frob")
        if finite(v):
            series["‖dW‖F/‖W0‖F"].append((float(step), float(v)))
    cols = colours(list(series))
    parts = []
    drift = [Line(n, cols[n], xy, markers=True) for n, xy in series.items() if xy and n.startswith("drift")]
    if drift:
        parts.append(line_chart(drift, "step", "mean 1 − cos (block outputs)", "activation drift along steps")
                     + legend([(ln.name, ln.colour) for ln in drift]))
    upd = series["‖dW‖F/‖W0‖F"]
    if upd:
        parts.append(line_chart([Line("‖dW‖F/‖W0‖F", cols["‖dW‖F/‖W0‖F"], upd, markers=True)], "step",
                                "mean ‖dW‖F / ‖W0‖F", "relative update size along steps"))
    return "".join(parts)


def _per_layer_chart(steps: list[tuple[int, dict]], get, ylabel: str, label: str) -> str:
    """One line per analysed step over the layers: `get(entry)` -> {layer: value}."""
    cols = colours([str(s) for s, _ in steps])
    lines = []
    for step, e in steps:
        vals = get(e) or {}
        xy = sorted((float(k), float(v)) for k, v in vals.items() if finite(v) and str(k).isdigit())
        if xy:
            lines.append(Line(f"step {step}", cols[str(step)], xy, markers=True))
    if not lines:
        return ""
    return f"<h4>{esc(label)}</h4>" + line_chart(lines, "layer", ylabel, label) + legend(
        [(ln.name, ln.colour) for ln in lines])


def _layer_metric(section: str, key: str):
    def get(e: dict) -> dict:
        per = (e.get(section) or {}).get("per_layer") or {}
        return {k: v.get(key) for k, v in per.items() if isinstance(v, dict)}
    return get


def _act_metric(set_name: str, key: str):
    def get(e: dict) -> dict:
        s = (e.get("activations") or {}).get(set_name) or {}
        if key == "update_response":
            return s.get("response_per_layer") or {}
        return {k: v.get(key) for k, v in (s.get("per_layer") or {}).items() if isinstance(v, dict)}
    return get


def _spectra(r: RunData, steps: list[tuple[int, dict]]) -> str:
    """dP(i) and E(i) of the modules with the largest relative update at the last step with a weights file."""
    for step, _ in reversed(steps):
        w = r.analysis.get(f"weights-step-{step:06d}")
        if isinstance(w, dict) and w.get("modules"):
            break
    else:
        return ""
    mods = [(n, m) for n, m in w["modules"].items() if isinstance(m, dict) and m.get("changed") and m.get("dp")]
    mods.sort(key=lambda nm: -(nm[1].get("rel_update_frob") or 0))
    mods = mods[:SPECTRUM_MODULES]
    if not mods:
        return ""
    cols = colours([n for n, _ in mods])
    parts = [f"<h4>Spectra at step {step}: the {len(mods)} modules with the largest ‖dW‖F/‖W0‖F</h4>"]
    for key, ylabel, what in (("dp", "dP(i) = |u_i^T Wft v_i − s_i|", "retention view"),
                              ("e", "E(i) = ‖dW v_i‖", "adaptation view")):
        lines = [Line(n, cols[n], [(float(i), float(v)) for i, v in zip(m["spectrum_index"], m[key]) if finite(v)])
                 for n, m in mods if m.get(key)]
        parts.append(f"<p>{esc(what)}</p>" + line_chart(lines, "singular index i of W0", ylabel, what))
    parts.append(legend([(n, c) for n, c in cols.items()]))
    return "".join(parts)


def geometry_one(r: RunData) -> str | None:
    summary = r.analysis.get("summary")
    if not isinstance(summary, dict):
        return None
    steps = _steps(summary)
    if not steps:
        return None
    note = ("<p class=\"note\">" + esc(f"{summary.get('method')} adds virtual tokens and changes no weight: "
                                        "activation space only.") + "</p>") if not summary.get("weight_change") else ""
    settings = summary.get("settings") or {}
    src = f"<p class=\"dim\">Layers {esc(settings.get('layers_used'))}; task prompts from " \
          f"{esc(settings.get('task_source') or '–')}; written by <code>sftlab analyze</code>.</p>"
    parts = [note, src, _table(steps), _along_steps(steps)]
    parts.append(_per_layer_chart(steps, _act_metric("general", "cosine_drift"), "1 − cos",
                                  "activation drift per layer, general text (block outputs)"))
    parts.append(_per_layer_chart(steps, _act_metric("task", "cosine_drift"), "1 − cos",
                                  "activation drift per layer, task prompts (block outputs)"))
    if summary.get("weight_change"):
        parts.append(_per_layer_chart(steps, _layer_metric("weights", "effective_rank"), "effective rank",
                                      "effective rank of dW per layer (mean over modules)"))
        parts.append(_per_layer_chart(steps, _layer_metric("weights", "intruders"), "intruders",
                                      "intruder dimensions per layer (sum over modules)"))
        parts.append(_per_layer_chart(steps, _act_metric("general", "update_response"), "E‖dW h‖² / E‖W0 h‖²",
                                      "update response per layer, general text"))
        parts.append(_spectra(r, steps))
    return "".join(p for p in parts if p)


def geometry(data: ReportData) -> str | None:
    return per_run(data, geometry_one)


register_section("geometry", "Geometry (weights and activations)", geometry, order=80)
