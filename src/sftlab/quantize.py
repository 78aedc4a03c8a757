"""Quantized bases through bitsandbytes: 4-bit NF4/FP4 (QLoRA, Dettmers et al. 2023) and 8-bit (LLM.int8,
Dettmers et al. 2022).

The quantized weights are frozen; an adapter trains on top in full precision. Everything that needs W0 as a
tensor (rewinding, interpolation, export, weight analysis, KL-to-base) loads the base the same way and
dequantizes it: W0 = dequant(quant(W)), the weights the adapter was trained against. For 4-bit that is the
function the run trained (bitsandbytes dequantizes the block and runs a float matmul); for 8-bit it is close
but not exact, as LLM.int8 also rounds the activations to int8 in each matmul.
"""

from __future__ import annotations

MIN_CPU_VERSION = (0, 46)  # the first bitsandbytes release with CPU kernels for 4-bit and 8-bit layers


def describe(q) -> str:
    """'nf4 (double quant)', 'int8', or '' for a full-precision base."""
    if not q.enabled:
        return ""
    if q.bits == 8:
        return "int8"
    return q.quant_type + (" (double quant)" if q.double_quant else "")


def base_tag(q) -> str:
    """Appended to a base's identity wherever outputs of the base are cached: a quantized base is another model."""
    if q is None or not q.enabled:
        return ""
    return f"|bnb{q.bits}:{q.quant_type}:{int(q.double_quant)}:{q.compute_dtype}"


def bnb_config(q, model_dtype: str):
    """The transformers BitsAndBytesConfig for a QuantizationSection."""
    import torch
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = model_dtype if q.compute_dtype == "auto" else q.compute_dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute))


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_backend(q, device) -> None:
    """Raise a ModelError that says what to install when bitsandbytes cannot run this quantization on `device`.

    Probing a tiny layer (milliseconds) is the only reliable test: bitsandbytes imports without a backend
    for a device and fails at the first matmul, deep inside the first training step."""
    import torch

    from .errors import ModelError

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelError(f"quantization.bits={q.bits} needs bitsandbytes, which is not installed: pip install "
                         "'bitsandbytes>=0.46' (or set quantization.bits=none)") from None
    device = torch.device(device)
    if device.type == "cpu" and _version(bnb.__version__) < MIN_CPU_VERSION:
        raise ModelError(f"quantization.bits={q.bits} on CPU needs bitsandbytes >= 0.46 (its CPU backend); "
                         f"found {bnb.__version__}: pip install -U bitsandbytes, or train on a GPU")
    try:
        _probe(bnb, q, device)
    except Exception as e:  # bitsandbytes reports a missing backend as RuntimeError, NotImplementedError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"quantization.bits={q.bits}: bitsandbytes {bnb.__version__} cannot run "
                         f"{describe(q)} layers on {device} ({first}); install a bitsandbytes build with a "
                         f"{device.type} backend, or set quantization.bits=none") from None


def _probe(bnb, q, device) -> None:
    """One forward + backward through a 16x16 quantized layer on `device`."""
    import torch

    w = torch.randn(16, 16)
    if q.bits == 8:
        layer = bnb.nn.Linear8bitLt(16, 16, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(16, 16, bias=False, compute_dtype=torch.float32, quant_type=q.quant_type,
                                  compress_statistics=q.double_quant)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=q.quant_type,
                                         compress_statistics=q.double_quant)
    layer = layer.to(device)
    with torch.enable_grad():  # callers may load a model inside no_grad (scoring, analysis)
        x = torch.randn(2, 16, device=device, requires_grad=True)
        layer(x).float().sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("the probe layer's backward gave no finite gradient")


def load_kwargs(q, model_dtype: str, device) -> dict:
    """Extra from_pretrained arguments for a quantized base on `device` (bitsandbytes places the weights itself)."""
    import torch

    device = torch.device(device)
    place = device.index if device.type == "cuda" and device.index is not None else str(device)
    return {"quantization_config": bnb_config(q, model_dtype), "device_map": {"": place}}


def dequantize(model, dtype: str):
    """The quantized model as a plain one: every bitsandbytes layer back to an nn.Linear holding dequant(W)."""
    import torch

    model.dequantize()  # transformers: bnb layers -> nn.Linear, drops the quantizer and quantization_config
    return model.to(getattr(torch, dtype))


def prepare_for_training(model):
    """PEFT's k-bit preparation: freeze the base and keep norms and embeddings in float32 for stable training.
    Gradient checkpointing stays the loop's business (train.gradient_checkpointing)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
