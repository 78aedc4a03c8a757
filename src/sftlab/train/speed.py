"""The fast path on a GPU: compiled decoder layers, fused AdamW, fixed bucket lengths, document masks.

All of it is opt-in (config `train.compile`, `train.fused_optimizer`, `data.pad_to_multiple`,
`model.attn_implementation=flex_attention`), so CPU runs behave as before.

Why per-layer compilation and not the whole model: every decoder layer has the same code, so
torch.compile traces one layer graph and reuses it for all of them (parameters are graph inputs),
which keeps the compile time to seconds and leaves the parts that change shape or hold Python
logic (mask construction from packed position ids, the chunked loss, PEFT wrappers) in eager
mode. This is what torchtune and torchtitan do.

Why buckets: a packed or padded batch's length changes from step to step; each new length costs
a recompile (or, after the second, a dynamic-shape graph that is slower). Padding every batch to a
multiple of `data.pad_to_multiple` (capped at max_length) leaves a handful of lengths.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import SftlabError


def decoder_layers(model) -> nn.ModuleList:
    """The repeated decoder blocks of a causal LM, under DDP/PEFT wrappers (Llama: model.model.layers).

    Found as the largest ModuleList whose children all have one class, so it works for every
    transformers decoder-only architecture without a per-architecture table."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    if best is None:
        raise SftlabError("train.compile: no repeated decoder layers found in this model to compile; set "
                          "train.compile=false")
    return best


def compile_layers(model, dynamic: bool | None = None) -> int:
    """torch.compile each decoder layer in place (nn.Module.compile keeps names and state_dict keys
    unchanged, so checkpoints and PEFT adapters are written exactly as without compilation).
    Returns the number of layers compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)


def compile_stats() -> dict:
    """Dynamo's counters since the last reset: graphs compiled, recompiles and graph breaks.

    `unique_graphs` counts every graph dynamo built (one per layer code object and shape class);
    with buckets it stays at a few per run, without them it grows with each new batch length until
    dynamo switches to a dynamic-shape graph."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - a torch without dynamo: nothing to report
        return {}
    stats = dict(counters.get("stats", {}))
    return {"unique_graphs": int(stats.get("unique_graphs", 0)),
            "calls_captured": int(stats.get("calls_captured", 0)),
            "recompiles": int(sum(counters.get("recompiles", {}).values())),
            "graph_breaks": int(sum(counters.get("graph_break", {}).values()))}


def fused_supported(device: torch.device, params) -> tuple[bool, str]:
    """Whether torch's fused AdamW runs here: every parameter on a device type the fused kernels support,
    floating point. Returns (ok, why not)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except Exception:  # noqa: BLE001 - older torch: fused kernels are CUDA-only there
        devices = {"cuda"}
    kinds = {p.device.type for p in params} or {device.type}
    missing = sorted(kinds - devices)
    if missing:
        return False, f"torch {torch.__version__} has fused AdamW kernels for {sorted(devices)}, not {missing}"
    if not all(p.is_floating_point() for p in params):
        return False, "a trainable parameter is not floating point"
    return True, ""


def adamw(groups: list[dict], lr: float, betas, fused: bool, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per parameter group when asked and supported (falls back to the
    multi-tensor `foreach` version with a warning when not: the update is the same maths)."""
    kw = {}
    if fused:
        params = [p for g in groups for p in g["params"]]
        ok, why = fused_supported(device, params)
        if ok:
            kw["fused"] = True
        else:
            warnings.warn(f"train.fused_optimizer: {why}; using the unfused (foreach) AdamW", stacklevel=2)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kw)


def check_attention(attn_implementation: str, device: torch.device, precision: str = "fp32") -> None:
    """FlexAttention (document masks as a BlockMask) has no backward on CPU in torch <= 2.13, and under
    autocast transformers hands it fp32 queries/keys (rotary embeddings promote them) with bf16 values,
    which flex_attention rejects: refuse both up front instead of failing at the first step."""
    if attn_implementation != "flex_attention":
        return
    if precision == "bf16":
        raise SftlabError("model.attn_implementation=flex_attention does not run under bf16 autocast "
                          "(train.precision=bf16: queries and keys reach it in fp32, values in bf16); train in "
                          "pure bf16 (model.dtype=bfloat16, train.precision=fp32) or use attn_implementation=sdpa")
    if device.type != "cuda":
        raise SftlabError(f"model.attn_implementation=flex_attention: torch {torch.__version__} has no "
                          f"FlexAttention backward on {device.type}; train with flex_attention on a CUDA GPU, "
                          "or use model.attn_implementation=sdpa here (packed rows still get per-example "
                          "attention through a mask)")

