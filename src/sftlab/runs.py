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
from .methods import METHODS
from .models import ModelRef, folder_hash, load_model, load_tokenizer, resolve_model
from .train.checkpoint import read_trajectory


class Run:
    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if not (self.dir / "config.yaml").is_file():
            raise SftlabError(f"{self.dir}: not a run directory (no config.yaml); give the folder `sftlab train` wrote")
        self.cfg = config_from_dict(yaml.safe_load((self.dir / "config.yaml").read_text()))
        self.method = METHODS.get(self.cfg.method.name)
        prov_path = self.dir / "provenance.json"
        self.provenance = json.loads(prov_path.read_text()) if prov_path.is_file() else {}

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
        raise SftlabError(f"{self.dir}: no checkpoint at step {step}; have {[e['step'] for e in entries]}")

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
        return load_tokenizer(self.base_ref(), self.cfg.model.trust_remote_code)

    def load(self, step: int | None = None, merge: bool = False):
        """(model, tokenizer) at a checkpoint: base + adapter (merged on request), or full weights."""
        entry = self.checkpoint(step)
        path = self.dir / entry["path"]
        ref = self.base_ref()
        tok = load_tokenizer(ref, self.cfg.model.trust_remote_code)
        if not self.method.peft:
            ref_ckpt = ModelRef(str(path), str(path), "", "local")
            return load_model(ref_ckpt, self.cfg.model.dtype, self.cfg.model.trust_remote_code), tok
        from peft import PeftModel

        base = load_model(ref, self.cfg.model.dtype, self.cfg.model.trust_remote_code)
        ctx = self.method.load_context() if self.method.load_context else contextlib.nullcontext()
        with ctx:
            model = PeftModel.from_pretrained(base, str(path))
        if merge:
            if self.method.merge is None:
                raise SftlabError(f"method {self.method.name!r} adds virtual tokens, it has no weights to merge; "
                                  "export it without --merge (as an adapter)")
            model = model.merge_and_unload()
        return model, tok


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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)


def export(run_dir: str, step: int | None, out: str, merge: bool) -> Path:
    run = Run(run_dir)
    entry = run.checkpoint(step)
    if merge and run.method.peft and run.method.merge is None:
        raise SftlabError(f"method {run.method.name!r} adds virtual tokens, it has no weights to merge; "
                          "export it without --merge (as an adapter)")
    with atomic_folder(out) as tmp:
        _write_export(run, entry, run.base_ref(), tmp, merge)
    return Path(out)


def _write_export(run: Run, entry: dict, base: ModelRef, tmp: Path, merge: bool) -> None:
    if run.method.peft and not merge:
        shutil.copytree(run.dir / entry["path"], tmp)
        cfg_path = tmp / "adapter_config.json"
        acfg = json.loads(cfg_path.read_text())
        acfg["base_model_name_or_path"] = base.location
        cfg_path.write_text(json.dumps(acfg, indent=2))
    else:
        model, _ = run.load(entry["step"], merge=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
    tok = load_tokenizer(base, run.cfg.model.trust_remote_code)
    tok.save_pretrained(str(tmp))  # tokenizer and chat template travel with the export
    if (Path(base.location) / "generation_config.json").is_file():
        shutil.copy(Path(base.location) / "generation_config.json", tmp / "generation_config.json")
    (tmp / "sftlab_export.json").write_text(json.dumps(
        {"run": str(run.dir), "step": entry["step"], "sha256": entry["sha256"], "merged": merge or not run.method.peft,
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
