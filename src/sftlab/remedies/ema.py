"""ema: an exponential moving average of the trained weights, checkpointed and scored as its own trajectory.

After every applied optimizer step the average moves: avg <- decay * avg + (1 - decay) * w, starting from the
starting weights (so it lags the trained weights along the path, roughly 1/(1 - decay) steps behind, and stays
closer to the base). Weight averaging along the path (Polyak & Juditsky 1992; used against forgetting e.g. by
Wortsman et al. 2022's model soups and by EMA teachers) is the training-time sibling of WiSE-FT.

The trained weights are untouched: the run's own trajectory is what it would be without the remedy. At each
trajectory checkpoint the average is swapped in, written to RUN/ema/checkpoints/step-N (a run directory of its
own: config.yaml and provenance.json copied, so `sftlab frontier RUN/ema`, `rewind`, `export` work on it),
scored with the run's cheap probes into RUN/ema/trajectory.jsonl, and swapped out again. Step 0 of the average
is the starting model, whose scores are copied from the run. The average (fp32, one copy of the trainable
weights) is saved beside it at each checkpoint so that `--resume` from that checkpoint continues it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..configtools import check, doc
from ..errors import SftlabError
from .base import Hooks, RemedySpec, register_remedy

FOLDER = "ema"  # RUN/ema: the average's run directory


@dataclass
class EMAOptions:
    decay: float = doc("avg <- decay x avg + (1 - decay) x weights after every step; the average lags about "
                       "1/(1 - decay) steps", default=0.9)

    def __post_init__(self):
        check(0 < self.decay < 1, "decay", f"must be in (0, 1), got {self.decay}")


class EMA(Hooks):
    def __init__(self, options: EMAOptions):
        self.options = options
        self.params: list = []
        self.avg: list = []
        self.started = False

    def setup(self, trainer) -> None:
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.avg = [p.detach().float().clone() for p in self.params]  # the starting weights

    def after_update(self, trainer) -> None:
        import torch

        if not self.started:
            self.started = True
            if trainer.pos["step"] > 0:  # a resumed run: continue the average saved with its checkpoint
                self._load(trainer, trainer.pos["step"])
        d = self.options.decay
        with torch.no_grad():
            for a, p in zip(self.avg, self.params):
                a.mul_(d).add_(p.detach().float(), alpha=1 - d)

    def on_checkpoint(self, trainer, step: int) -> None:
        import torch

        from ..scoring import append_scores, score_model
        from ..train.checkpoint import write_checkpoint

        out = self._folder(trainer)
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.avg):
                p.copy_(a.to(p.dtype))
        try:
            write_checkpoint(out, step, trainer.model, trainer.method.peft, extra={"ema_decay": self.options.decay})
            if trainer.scorer is not None:
                model = getattr(trainer.model, "module", trainer.model)
                append_scores(out, step, score_model(model, trainer.tokenizer, trainer.scorer.probes,
                                                     trainer.scorer.ctx))
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)
        self._save(out, step)

    def _folder(self, trainer) -> Path:
        """RUN/ema, made on the first checkpoint: the run's config and provenance, and its step-0 scores."""
        from ..rundir_format import read_trajectory
        from ..scoring import append_scores

        out = Path(trainer.run_dir) / FOLDER
        if not (out / "config.yaml").is_file():
            out.mkdir(parents=True, exist_ok=True)
            for name in ("provenance.json", "tokenizer"):
                src = Path(trainer.run_dir) / name
                if src.is_dir():
                    shutil.copytree(src, out / name, dirs_exist_ok=True)
                elif src.is_file():
                    shutil.copy2(src, out / name)
            start = next((e for e in read_trajectory(trainer.run_dir) if e["step"] == 0 and e.get("scores")), None)
            if start is not None and not any(e["step"] == 0 for e in read_trajectory(out)):
                append_scores(out, 0, start["scores"], {"copied_from": str(trainer.run_dir)})
            shutil.copy2(Path(trainer.run_dir) / "config.yaml", out / "config.yaml")  # last: marks it made
        return out

    def _save(self, out: Path, step: int) -> None:
        from safetensors.torch import save_file

        tmp = out / f".average.{os.getpid()}.tmp"
        save_file({str(i): a for i, a in enumerate(self.avg)}, str(tmp), metadata={"step": str(step)})
        os.replace(tmp, out / "average.safetensors")

    def _load(self, trainer, step: int) -> None:
        from safetensors import safe_open

        path = Path(trainer.run_dir) / FOLDER / "average.safetensors"
        saved = None
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("step") == str(step):
                    saved = [f.get_tensor(str(i)) for i in range(len(self.avg))]
        if saved is None:
            raise SftlabError(f"{path}: the moving average at step {step} was not saved (resume state and "
                              "checkpoints out of step); resume from a trajectory checkpoint (checkpoint."
                              "resume_every=0) or train the run again")
        self.avg = [s.to(a.device) for s, a in zip(saved, self.avg)]

    def provenance(self) -> dict:
        return {"decay": self.options.decay, "run_dir": FOLDER, "info": json.dumps({"start": "step 0 weights"})}


register_remedy(RemedySpec("ema", EMAOptions, EMA,
                           "exponential moving average of the weights, checkpointed and scored as its own trajectory "
                           "in RUN/ema", "average", cite="Polyak & Juditsky 1992", needs_probes=True))
