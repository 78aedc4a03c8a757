"""Score checkpoints with the run's probes and record the scores in trajectory.jsonl.

The same function scores a model during training (a callback on each checkpoint) and afterwards
(`sftlab eval RUN`), so scores made either way are the same numbers. Step 0 is the starting model.
Scores are appended as `{"step": N, "scores": {name: score}}` lines; `read_trajectory` merges them
into the checkpoint's entry (later lines win per score name).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .objectives import cast_linear_weights
from .probes import ProbeContext, build_probe


def build_probes(cfg, which: str = "cheap") -> list:
    """The config's probes; `which` is 'cheap' (likelihood-based), 'generation', or 'all'."""
    probes = [build_probe(p.name, p.options) for p in cfg.probes]
    if which == "cheap":
        return [p for p in probes if p.cheap]
    if which == "generation":
        return [p for p in probes if not p.cheap]
    return probes


def score_model(model, tokenizer, probes, ctx: ProbeContext) -> dict:
    """{score name: score dict}, model in eval mode under no_grad; the caller's mode and RNG are restored."""
    was_training = model.training
    rng = torch.get_rng_state()  # scoring must not shift training's dropout stream
    model.eval()
    out = {}
    device = torch.device(ctx.resolve_device(model))
    try:
        bf16 = ctx.precision == "bf16"
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), \
                cast_linear_weights(model, torch.bfloat16 if bf16 else None):
            for probe in probes:
                t0 = time.time()
                s = probe.score(model, tokenizer, ctx).to_dict()
                s["seconds"] = round(time.time() - t0, 3)
                out[s["name"]] = s
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    return out


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def append_scores(run_dir: Path, step: int, scores: dict, extra: dict | None = None) -> None:
    """One scores line in trajectory.jsonl, durably; a full disk gives one clear line and leaves no torn line
    that could swallow the next checkpoint's entry."""
    from .train.checkpoint import append_jsonl, write_error

    run_dir = Path(run_dir)
    try:
        append_jsonl(run_dir / "trajectory.jsonl", {"step": step, "scores": scores, **(extra or {})})
    except OSError as e:
        raise write_error(run_dir, f"the scores of step {step} to trajectory.jsonl", e, run_dir,
                          then=f"sftlab train {run_dir / 'config.yaml'} --resume, or sftlab eval {run_dir}") from e


def context_for(cfg, base_ref, device=None) -> ProbeContext:
    from .models import load_model

    from .quantize import base_tag

    precision = cfg.train.precision if cfg.scoring.precision == "auto" else cfg.scoring.precision
    # Retention's reference (kl_to_base): by default the original full-precision base, for every run, so that
    # quantized and full-precision runs are measured from one point and a quantized run's step 0 shows what the
    # quantization itself cost. scoring.retention_base: dequantized compares against the quantized base the
    # adapter trained on (quantize.py), another model than the original: its cached outputs are kept apart.
    quant = cfg.quantization if cfg.scoring.retention_base == "dequantized" and cfg.quantization.enabled else None
    return ProbeContext(device=device, batch_size=cfg.scoring.batch_size, seed=cfg.run.seed, precision=precision,
                        base_id=(base_ref.sha256 or base_ref.location) + base_tag(quant),
                        load_base=lambda: load_model(base_ref, cfg.model.dtype, cfg.model.trust_remote_code,
                                                     quant=quant, dequantize=quant is not None))


def base_scores_file(cfg, base_ref) -> Path:
    """Where the base model's scores under this config's probes are kept, shared by every run that could
    reuse them: keyed by the base's weights, the model and scoring settings, the probes' options and the
    contents of the files they read (so an edited probe file is a new key, never a stale hit)."""
    from dataclasses import asdict

    from .models import cache_root, file_sha256

    probes = [{"name": p.name, "options": asdict(p.options)} for p in cfg.probes]
    values = [x for p in probes for v in p["options"].values() for x in (v if isinstance(v, list) else [v])]
    files = sorted({v for v in values if isinstance(v, str) and v and os.path.isfile(v)})  # lists: lm_eval tasks
    key = {"version": 1, "base": base_ref.sha256 or str(base_ref.location), "model": asdict(cfg.model),
           **({"quantization": asdict(cfg.quantization)} if cfg.quantization.enabled else {}),
           "scoring": asdict(cfg.scoring), "precision": cfg.train.precision, "seed": cfg.run.seed,
           "probes": probes, "files": {f: file_sha256(f) for f in files}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_root() / "base_scores" / f"{digest}.json"


class ScoreCallback:
    """Scores cheap probes on the starting model and at every trajectory checkpoint, during training.

    When the method starts exactly at the base (every method but prefix/prompt tuning), the step-0 scores
    are the base's: they are computed once per base and probe set and shared through the cache, so an
    arena's trials (or a rerun) do not pay for them again.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.scored: list[tuple[int, dict]] = []  # (step, scores) not yet announced: the loop sends on_scored
        self.probes = build_probes(trainer.cfg, "cheap")
        self.ctx = context_for(trainer.cfg, trainer.ref, trainer.dist.device)
        self.seconds = 0.0

    def _score(self, step: int, share: Path | None = None) -> None:
        t0 = time.time()
        model = getattr(self.trainer.model, "module", self.trainer.model)
        scores = score_model(model, self.trainer.tokenizer, self.probes, self.ctx)
        append_scores(self.trainer.run_dir, step, scores)
        if share is not None:
            write_json_atomic(share, scores)
        self.seconds += time.time() - t0
        self.scored.append((step, scores))

    def on_train_start(self, step: int) -> None:
        if step != 0:
            return
        # A run started from another run's checkpoint (model.init_from, e.g. DPO after SFT) does not start at
        # the base: its step 0 is that checkpoint, scored here, never the base's shared scores.
        at_base = self.trainer.method.starts_at_base and self.trainer.start is None
        share = base_scores_file(self.trainer.cfg, self.trainer.ref) if at_base else None
        if share is not None and share.is_file():
            scores = json.loads(share.read_text(encoding="utf-8"))
            append_scores(self.trainer.run_dir, 0, scores, {"shared": str(share)})
            self.scored.append((0, scores))
            return
        self._score(0, share)

    def on_checkpoint(self, step, entry):
        self._score(step)

    def on_step_end(self, step, metrics): pass
    def on_eval(self, step, metrics): pass

    def on_train_end(self, step, summary):
        append_scores(self.trainer.run_dir, step, {}, {"scoring_seconds": round(self.seconds, 3)})


def evaluate_run(run_dir: str, steps: list[int] | None = None, which: str = "cheap", base: bool = True,
                 progress: bool = True) -> list[int]:
    """Score saved checkpoints (and the starting model as step 0) offline; returns the steps scored."""
    from .runs import Run

    run = Run(run_dir)
    probes = build_probes(run.cfg, which)
    if not probes:
        return []
    ref = run.base_ref()
    ctx = context_for(run.cfg, ref)
    entries = [e for e in run.checkpoints() if e.get("path") and (steps is None or e["step"] in steps)]
    todo = ([0] if base and (steps is None or 0 in steps) else []) + [e["step"] for e in entries]
    it = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc="scoring checkpoints", unit="ckpt")
    for step in it:
        if step == 0:  # the starting model: the base, or the checkpoint of the run this one started from
            model, tok = run.load_initial(), run.tokenizer()  # with new tokens: the resized base
        else:
            model, tok = run.load(step)
        # retention is against the base, never against a starting run (nor the base resized for new tokens, nor
        # a quantized run's dequantized base unless scoring.retention_base asks for it)
        q = run.cfg.quantization
        reference = not q.enabled or run.cfg.scoring.retention_base == "dequantized"
        if step == 0 and run.start() is None and not run.cfg.model.new_tokens and reference:
            ctx.base_model = model
        append_scores(run.dir, step, score_model(model, tok, probes, ctx))
        if step != 0:
            del model
    return todo
