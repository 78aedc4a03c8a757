"""`sftlab export`: choose the point (a step, the run's selection rule, or alpha along the path to it), then write
it as an adapter / merged folder (format hf) or one GGUF file with a Modelfile (format gguf), each with the model
card. The folder appears whole or not at all (runs.atomic_folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SftlabError
from .card import ExportInfo, base_origin, write_card

FORMATS = ("hf", "gguf")


@dataclass
class Chosen:
    step: int
    rule: str = ""
    reason: str = ""


def choose(run, step: int | None, select: bool) -> Chosen:
    """The step to export: --step, the run's `select:` rule (--select), or the last checkpoint."""
    if step is not None and select:
        raise SftlabError("--step and --select both choose the point; give one")
    if not select:
        return Chosen(run.checkpoint(step)["step"])
    from ..rewinding import run_points, stated_policy
    from ..trajectory import rewind

    points, _, _ = run_points(run.dir)
    policy, params, called = stated_policy(run.dir, None, {})
    choice = rewind(points, policy, **params)
    if choice.point.step == 0:
        raise SftlabError(f"{run.dir}: {called} chose the base model (step 0): nothing to export; the fine-tuning "
                          "did not pay off under this rule")
    return Chosen(choice.point.step, called, choice.reason)


def export_run(run_dir: str, out: str, step: int | None = None, select: bool = False, alpha: float | None = None,
               fmt: str = "hf", quant: str = "f16", merge: bool = False, rule: str = "", reason: str = "") -> Path:
    """Write the chosen point of `run_dir` to the folder `out`; returns it. `rule` and `reason` (from sftlab
    rewind, which chose `step` itself) go into the card."""
    from ..runs import Run

    if fmt not in FORMATS:
        raise SftlabError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    run = Run(run_dir)
    point = Chosen(run.checkpoint(step)["step"], rule, reason) if rule else choose(run, step, select)
    if alpha is not None:
        from ..interpolate import check_alpha

        alpha = check_alpha(alpha)
    if fmt == "gguf":
        return _export_gguf(run, point, alpha, out, quant)
    partial = alpha not in (None, 1.0)
    merged = merge or partial or not run.method.peft
    info = ExportInfo(point.step, alpha, point.rule, point.reason, "merged" if merged else "adapter")

    def finish(tmp: Path, entry: dict) -> None:
        write_card(tmp, run, info)

    if partial:
        from ..interpolate import export_at

        return export_at(run, point.step, alpha, out, merge=True, finish=finish)
    from ..runs import export

    return export(str(run.dir), point.step, out, merge, finish=finish)


def _refuse_unmergeable(run) -> None:
    if run.method.peft and run.method.merge is None:
        raise SftlabError(f"method {run.method.name!r} adds virtual tokens and has no weights to merge, and a GGUF "
                          "file holds plain weights only: export it as an adapter (--format hf)")


def _export_gguf(run, point: Chosen, alpha: float | None, out: str, quant: str) -> Path:
    from .gguf import QUANTS

    if quant not in QUANTS:
        raise SftlabError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    _refuse_unmergeable(run)
    from ..runs import atomic_folder

    entry = run.checkpoint(point.step)
    name = f"{run.dir.name}-step{point.step}" + (f"-alpha{alpha:g}" if alpha not in (None, 1.0) else "")
    gguf_name = f"{name}-{quant}.gguf"
    info = ExportInfo(point.step, alpha, point.rule, point.reason, "gguf", quant, [gguf_name, "Modelfile"])
    model, tok = _merged(run, point.step, alpha)
    with atomic_folder(out) as tmp:
        tmp.mkdir(parents=True)
        write_gguf_folder(tmp, run, model, tok, gguf_name, quant, name)
        (tmp / "sftlab_export.json").write_text(json.dumps(
            {"run": str(run.dir), "step": point.step, "alpha": alpha, "format": "gguf", "quant": quant,
             "file": gguf_name, "sha256": entry["sha256"], "merged": True,
             "base_model": run.provenance.get("base_model")}, indent=2))
        write_card(tmp, run, info)
    return Path(out)


def _merged(run, step: int, alpha: float | None):
    """(plain merged HF model in float32, tokenizer) at the point."""
    import torch

    if alpha not in (None, 1.0):
        from ..interpolate import model_at

        model, tok = model_at(run, step, alpha)
    else:
        model, tok = run.load(step, merge=True)
    return model.to(torch.float32).eval(), tok


def write_gguf_folder(folder: Path, run, model, tok, gguf_name: str, quant: str, name: str) -> None:
    """The GGUF file and its Modelfile, with the base's license, origin, generation defaults and pre-tokenizer."""
    from .gguf import GGUFMeta, read_pre, write_gguf
    from .modelfile import modelfile

    origin = base_origin(run.provenance)
    loc = Path((run.provenance.get("base_model") or {}).get("location", ""))
    gen_file = loc / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    src = loc / "sftlab_source.json"
    source_gguf = json.loads(src.read_text()).get("gguf", "") if src.is_file() else ""
    pre = read_pre(source_gguf) if source_gguf and Path(source_gguf).is_file() else "default"
    write_gguf(model, tok, folder / gguf_name, quant,
               GGUFMeta(name=name, license=origin.license, base_repo=origin.hub_id, pre=pre, generation=gen,
                        source=source_gguf))
    (folder / "Modelfile").write_text(modelfile(gguf_name, tok, gen), encoding="utf-8")
