"""Read a run directory back: its config, base model, checkpoints; load, export and chat with them.

Only the run directory (plus the base model it names) is needed, so this works on runs made
elsewhere; adapters are plain PEFT folders.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import yaml

from .config import config_from_dict
from .errors import SftlabError
from .faults import fault
from .methods import METHODS
from .models import ModelRef, folder_hash, load_model, load_tokenizer, resolve_model
from .rundir_format import read_provenance, read_trajectory
from .train.checkpoint import WRITE_ERRORS


class Run:
    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if not (self.dir / "config.yaml").is_file():
            raise SftlabError(f"{self.dir}: not a run directory (no config.yaml); give the folder `sftlab train` wrote")
        self.cfg = config_from_dict(yaml.safe_load((self.dir / "config.yaml").read_text()))
        self.method = METHODS.get(self.cfg.method.name)
        self.provenance = read_provenance(self.dir)

    def checkpoints(self) -> list[dict]:
        """Complete checkpoints (entries with weights), in step order."""
        return [e for e in read_trajectory(self.dir) if e.get("path")]

    def trajectory(self) -> list[dict]:
        """Every scored point, step 0 (the starting model) included."""
        return read_trajectory(self.dir)

    def checkpoint(self, step: int | None) -> dict:
        entries = self.checkpoints()
        if not entries:
            raise SftlabError(f"{self.dir}: no complete checkpoint yet")
        if step is None:
            return entries[-1]
        for e in entries:
            if e["step"] == step:
                return e
        why = " (its weights were deleted as dominated: checkpoint.keep=frontier)" if any(
            e["step"] == step and e.get("pruned") for e in read_trajectory(self.dir)) else ""
        raise SftlabError(f"{self.dir}: no checkpoint at step {step}{why}; have {[e['step'] for e in entries]}")

    def base_ref(self) -> ModelRef:
        base = self.provenance.get("base_model", {})
        loc = base.get("location")
        if loc and Path(loc).is_dir():
            ref = ModelRef(base.get("spec", loc), loc, base.get("sha256", ""), base.get("source", "local"))
            if ref.sha256 and folder_hash(loc) != ref.sha256:
                raise SftlabError(f"{loc}: base model changed since the run (content hash differs); "
                                  "the checkpoints no longer apply to it")
            return ref
        ref = resolve_model(self.cfg.model.path, self.cfg.model.gguf_file)
        want = base.get("sha256", "")
        if want and ref.sha256 and ref.sha256 != want:
            raise SftlabError(f"{ref.location}: not the base model this run trained (content hash differs from "
                              "provenance.json); the checkpoints do not apply to it")
        return ref

    def tokenizer(self):
        """The run's tokenizer: the base's, or with `model.new_tokens` the one saved in RUN/tokenizer. A
        vision-language run's is its processor's tokenizer (models.processor_of finds the processor)."""
        from .models import is_vision_language, load_processor
        from .tokens import TOKENIZER_DIR

        saved = self.dir / TOKENIZER_DIR
        base = self.base_ref()
        ref = base
        if self.cfg.model.new_tokens:
            if not (saved / "tokenizer_config.json").is_file():
                raise SftlabError(f"{saved}: missing; this run added tokens and its tokenizer was saved there")
            ref = ModelRef(str(saved), str(saved), "", "local")
        if is_vision_language(base.location):
            proc = load_processor(ref, self.cfg.model.trust_remote_code)
            proc.sftlab_max_pixels = self.cfg.vision.max_image_pixels
            return proc.tokenizer
        return load_tokenizer(ref, self.cfg.model.trust_remote_code)

    def load_initial(self):
        """What training started from, before the method: load_start() with the run's new tokens (resized
        embeddings, new rows initialised exactly as in training)."""
        from .tokens import init_new_rows

        model = self.load_start()
        if self.cfg.model.new_tokens:
            init_new_rows(model, self.tokenizer(), self.cfg.model, self.cfg.run.seed)
        return model

    def start(self) -> StartPoint | None:
        """The run this one started from (`model.init_from`, e.g. DPO after SFT), or None: it started at the base."""
        info = self.provenance.get("start")
        return StartPoint.from_info(info, self.dir) if info else None

    def load_start(self):
        """The model at step 0: the base, or the starting run's checkpoint (merged), in this run's dtype."""
        start = self.start()
        if start is None:  # a quantized run's W0 is its base dequantized: the weights the adapter trained against
            return load_model(self.base_ref(), self.cfg.model.dtype, self.cfg.model.trust_remote_code,
                              quant=self.cfg.quantization, dequantize=True)
        return start.load(self.cfg.model.dtype)

    def load(self, step: int | None = None, merge: bool = False):
        """(model, tokenizer) at a checkpoint: base + adapter (merged on request), or full weights."""
        entry = self.checkpoint(step)
        path = self.dir / entry["path"]
        tok = self.tokenizer()
        if not self.method.peft:
            ref_ckpt = ModelRef(str(path), str(path), "", "local")
            return load_model(ref_ckpt, self.cfg.model.dtype, self.cfg.model.trust_remote_code), tok
        model, _ = self.load_adapter(self.load_initial(), path)  # on what the adapter was trained on
        if merge:
            if self.method.merge is None:
                raise SftlabError(f"method {self.method.name!r} adds virtual tokens, it has no weights to merge; "
                                  "export it without --merge (as an adapter)")
            model = model.merge_and_unload()
        return model, tok

    def load_adapter(self, base, path: Path):
        """(PeftModel, [tokens.TokenRows]): the adapter folder `path` on `base` (Run.load_initial). A non-LoRA adapter
        with new tokens keeps their rows in path/tokens, a TrainableTokens adapter merged into `base` first: the
        plain-PEFT recipe of tokens.py; the rows say where they were before and after (for rewinding)."""
        from peft import PeftModel

        from .tokens import merge_token_adapter

        base, rows = merge_token_adapter(base, path)
        ctx = self.method.load_context() if self.method.load_context else contextlib.nullcontext()
        with ctx:
            return PeftModel.from_pretrained(base, str(path)), rows


class StartPoint:
    """A checkpoint of another run that a run starts from (DPO on an SFT result). Only ever read."""

    def __init__(self, run: Run, step: int):
        self.run = run
        self.entry = run.checkpoint(step)
        self.step = self.entry["step"]
        if run.method.peft and run.method.merge is None:
            raise SftlabError(f"model.init_from: {run.dir} trained {run.method.name!r}, which adds virtual tokens "
                              "and has no weights to merge; start from a run of a method with a weight update")

    @classmethod
    def parse(cls, spec: str) -> StartPoint:
        """'RUN' (its last checkpoint) or 'RUN:STEP'."""
        path, sep, step = spec.rpartition(":")
        if sep and step.isdigit() and path:
            return cls(Run(path), int(step))
        return cls(Run(spec), None)

    @classmethod
    def from_info(cls, info: dict, run_dir: Path) -> StartPoint:
        """From provenance's 'start': the path relative to the run (folders that move together) or absolute."""
        cands = ([run_dir / info["run_rel"]] if info.get("run_rel") else []) + [Path(info["run"])]
        for cand in cands:
            if (cand / "config.yaml").is_file():
                point = cls(Run(cand), info["step"])
                break
        else:
            raise SftlabError(f"{run_dir}: started from {info['run']} (step {info['step']}), which is gone; "
                              "put that run directory back to load this run's checkpoints")
        point.verify(info.get("sha256", ""))
        return point

    def verify(self, sha256: str) -> None:
        from .train.checkpoint import hash_files

        now = hash_files(self.run.dir / self.entry["path"])
        if now != self.entry["sha256"] or (sha256 and now != sha256):
            raise SftlabError(f"{self.run.dir / self.entry['path']}: checkpoint changed since it was recorded "
                              "(sha256 differs); the run that started from it no longer applies to it")

    def identity(self) -> str:
        return f"run-checkpoint:{self.entry['sha256']}"

    def info(self, run_dir: Path) -> dict:
        import os

        return {"run": str(self.run.dir.resolve()), "run_rel": os.path.relpath(self.run.dir.resolve(),
                                                                                Path(run_dir).resolve()),
                "step": self.step, "checkpoint": self.entry["path"], "sha256": self.entry["sha256"],
                "method": self.run.method.name,
                "base_model": self.run.provenance.get("base_model")}

    def base_ref(self) -> ModelRef:
        return self.run.base_ref()

    def load(self, dtype: str):
        """The starting model as a plain HF model: full weights, or base + adapter merged."""
        import torch

        self.verify("")
        model, _ = self.run.load(self.step, merge=True)
        return model.to(getattr(torch, dtype))


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only when the block succeeds (nothing half-written)."""
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise SftlabError(f"{dest}: exists and is not empty; choose another output folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WRITE_ERRORS):  # disk full, no permission: one line, not a traceback
            raise export_write_error(dest, e) from e
        raise


def export_write_error(dest: Path, e: BaseException) -> SftlabError:
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    where = dest.parent if dest.parent.exists() else Path.cwd()
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return SftlabError(f"{dest}: cannot write the export ({reason}; {free} there); nothing partial was kept and "
                       "the run is unchanged. Free disk space or make the folder writable (or choose another "
                       "output folder), then run the same command again")


def export(run_dir: str, step: int | None, out: str, merge: bool, finish=None) -> Path:
    """Write checkpoint `step` to `out` (an adapter, or merged); `finish(tmp_folder, entry)` adds files (the model
    card) before the folder appears."""
    run = Run(run_dir)
    entry = run.checkpoint(step)
    if merge and run.method.peft and run.method.merge is None:
        raise SftlabError(f"method {run.method.name!r} adds virtual tokens, it has no weights to merge; "
                          "export it without --merge (as an adapter)")
    if run.method.peft and not merge and run.start() is not None:
        raise SftlabError(f"{run.dir}: its adapter was trained on top of {run.start().run.dir} (model.init_from), "
                          "not on the base alone; export it with --merge (a standalone model)")
    with atomic_folder(out) as tmp:
        _write_export(run, entry, run.base_ref(), tmp, merge)
        if finish is not None:
            finish(tmp, entry)
    return Path(out)


def _write_export(run: Run, entry: dict, base: ModelRef, tmp: Path, merge: bool) -> None:
    if run.method.peft and not merge:
        shutil.copytree(run.dir / entry["path"], tmp)  # with ADAPTER/tokens, the new-token rows of non-LoRA methods
        point_adapter_at_base(tmp, base.location)
    else:
        model, _ = run.load(entry["step"], merge=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
    fault("export", entry["step"], half_written=tmp)
    finish_export(tmp, run, entry, base, run.tokenizer(), merge or not run.method.peft)


def point_adapter_at_base(folder: Path, location: str) -> None:
    """An exported adapter folder (and its tokens/ adapter, if any) names the base this run used."""
    from .tokens import TOKEN_ADAPTER_DIR

    for cfg_path in (folder / "adapter_config.json", folder / TOKEN_ADAPTER_DIR / "adapter_config.json"):
        if cfg_path.is_file():
            acfg = json.loads(cfg_path.read_text())
            acfg["base_model_name_or_path"] = location
            cfg_path.write_text(json.dumps(acfg, indent=2))


def finish_export(tmp: Path, run: Run, entry: dict, base: ModelRef, tokenizer, merged: bool, **extra) -> None:
    """What every export folder gets beside the weights: the tokenizer (with any added tokens) and chat
    template, the base's generation config, and sftlab_export.json (run, step, `extra` such as alpha, sha256). A
    vision-language run's folder gets its whole processor (AutoProcessor.from_pretrained reads it)."""
    from .models import processor_of

    (processor_of(tokenizer) or tokenizer).save_pretrained(str(tmp))
    if (Path(base.location) / "generation_config.json").is_file():
        shutil.copy(Path(base.location) / "generation_config.json", tmp / "generation_config.json")
    (tmp / "sftlab_export.json").write_text(json.dumps(
        {"run": str(run.dir), "step": entry["step"], **extra, "sha256": entry["sha256"], "merged": merged,
         "base_model": run.provenance.get("base_model")}, indent=2))


def chat(run_dir: str, step: int | None, max_new_tokens: int = 256, temperature: float = 0.0,
         input_fn=input, print_fn=print) -> None:
    """Talk to a checkpoint in the terminal. Empty line or EOF ends; '/reset' clears the history."""
    import torch

    run = Run(run_dir)
    model, tok = run.load(step)
    model.eval()
    history: list[dict] = []
    print_fn(f"chatting with {run.dir} step {run.checkpoint(step)['step']} (empty line or Ctrl-D to quit, "
             "/reset to clear)")
    while True:
        try:
            text = input_fn("you> ")
        except EOFError:
            break
        if not text.strip():
            break
        if text.strip() == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            gen["temperature"] = temperature
        with torch.no_grad():
            out = model.generate(**ids, **gen)
        reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        print_fn(f"model> {reply}")
