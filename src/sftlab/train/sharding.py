"""Several processes: DDP, or parameters, gradients and optimizer states sharded with torch FSDP2.

FSDP2 (`torch.distributed.fsdp.fully_shard`, per-parameter DTensor sharding; Zhao et al. 2023 for FSDP) wraps
each decoder layer and then the whole model, so each process holds 1/world of every weight and gathers a
layer's weights just for its forward and backward. The loop stays the same: gradients are averaged over
processes like DDP's, `no_sync()` skips the reduce-scatter on accumulation micro-batches, and checkpoints
are gathered to full tensors first, so a sharded run writes the same PEFT/HF folders as one process.

Where the sharding settings come from (`distributed.strategy`):
  fsdp       the `distributed` section;
  deepspeed  a DeepSpeed ZeRO config, translated: stage 3 = FSDP2 resharding after forward, stage 2 = keeping
             gathered weights until backward, offload to cpu = FSDP2's CPU offload. The DeepSpeed engine is
             not used (sftlab's loop and checkpoints stay one code path); see deepspeed.py;
  auto       what `accelerate launch --config_file X.yaml` put in the environment (its FSDP_* or DeepSpeed
             settings), else ddp.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import SftlabError
from .shardspec import Sharding  # noqa: F401  (callers import it from here)


def _env_flag(env, name: str) -> bool:
    return str(env.get(name, "")).strip().lower() in ("1", "true", "yes")


def from_accelerate_env(env, train, world: int) -> Sharding | None:
    """The FSDP/DeepSpeed settings `accelerate launch` exported for its config file, or None (it asked for none)."""
    if _env_flag(env, "ACCELERATE_USE_DEEPSPEED"):
        from .deepspeed import sharding_from_accelerate_env

        return sharding_from_accelerate_env(env, train, world)
    if not _env_flag(env, "ACCELERATE_USE_FSDP"):
        return None
    if env.get("FSDP_VERSION", "1") != "2":
        raise SftlabError("accelerate config: fsdp_version 1 asks for the FSDP1 wrapper; sftlab shards with FSDP2: "
                          "set fsdp_version: 2 in the fsdp_config (configs/accelerate/fsdp2.yaml)")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in ("true", "false", "full_shard", "shard_grad_op"):
        raise SftlabError(f"accelerate config: fsdp_reshard_after_forward {reshard!r}; use true or false")
    classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return Sharding("fsdp", reshard in ("true", "full_shard"), _env_flag(env, "FSDP_OFFLOAD_PARAMS"),
                    _env_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"), "accelerate launch", classes)


def resolve(section, train, world: int, device: torch.device, env=None) -> Sharding:
    """The sharding this process group uses: the config's `distributed` section, or accelerate's settings."""
    if world <= 1:
        return Sharding("none")
    strategy = section.strategy
    found = None
    if strategy == "auto":
        found = from_accelerate_env(os.environ if env is None else env, train, world)
        if found is None and section.deepspeed_config:
            strategy = "deepspeed"
    if strategy == "deepspeed":
        from .deepspeed import load_config, to_sharding

        if not section.deepspeed_config:
            raise SftlabError("distributed.strategy=deepspeed: set distributed.deepspeed_config to a DeepSpeed JSON "
                              "file (configs/accelerate/deepspeed_zero3.json), or launch with accelerate and a "
                              "deepspeed_config in its YAML")
        found = to_sharding(load_config(section.deepspeed_config), train, world, section.deepspeed_config)
    elif strategy == "fsdp":
        found = Sharding("fsdp", section.reshard_after_forward, section.cpu_offload,
                         section.activation_checkpointing, "config")
    if found is None or found.kind == "ddp":
        return Sharding("ddp", source=found.source if found else "config")
    if found.cpu_offload and device.type != "cuda":
        raise SftlabError("distributed: cpu_offload moves sharded weights between GPU and CPU memory; on CPU "
                          "training they are in CPU memory already: turn it off (FSDP2 on CPU refuses it)")
    return found


def decoder_layers(model: nn.Module, classes: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules FSDP shards one by one: the model's decoder layers (transformers' _no_split_modules)."""
    from ..objectives import unwrap

    names = set(classes) or set(getattr(unwrap(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SftlabError(f"distributed: found no decoder layers to shard (looked for {sorted(names) or 'none'}); "
                          "name them in accelerate's fsdp_transformer_layer_cls_to_wrap")
    return layers


class FSDPWrapped(nn.Module):
    """The FSDP2-sharded model behind DDP's interface: `.module`, `no_sync()`. The rest of sftlab reaches the
    PEFT/HF model through `.module` as it does under DDP."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the last micro-batch of the step reduce-scatters the sum."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def wrap(model: nn.Module, sharding: Sharding) -> nn.Module:
    """DDP or FSDP2 around a model whose method is applied and which sits on this process's device."""
    if sharding.kind == "ddp":
        # Every trainable parameter gets a gradient each step (the output layer is applied outside the
        # wrapped forward, in the loss, which DDP's gradient hooks still see), so no unused-parameter search.
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy() if sharding.cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model, sharding.wrap_classes):
        fully_shard(layer, reshard_after_forward=sharding.reshard_after_forward, offload_policy=offload)
    # The root group (embeddings, final norm, output layer) is not resharded after forward, so the output
    # layer is still gathered when the loss applies it outside the forward (objectives.forward_hidden).
    fully_shard(model, reshard_after_forward=False, offload_policy=offload)
    return FSDPWrapped(model)


def is_sharded(model) -> bool:
    return isinstance(model, FSDPWrapped)


def gather_trainable(model) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters, by the names of the unwrapped model. A collective under
    FSDP: every process must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    inner = getattr(model, "module", model)
    out = {}
    for name, p in inner.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().to("cpu").contiguous().clone()
    return out


def gather_full(model) -> dict[str, torch.Tensor]:
    """The whole state dict as full CPU tensors on process 0 (empty elsewhere); a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied output layer appears under both names here; named_parameters() lists it once, as save_pretrained
    # of an unsharded model writes it (one tensor, the tie restored on load).
    keep = {n for n, _ in model.module.named_parameters()} | {n for n, _ in model.module.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def gather_optimizer(model, optimizer) -> dict:
    """The optimizer state as full tensors keyed by parameter name, on process 0; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model.module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_trainable(model, weights: dict[str, torch.Tensor]) -> None:
    """Full tensors (a resume state) into the sharded trainable parameters: each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model.module, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model.module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def gathered_states(model, optimizer, peft: bool, weights: bool, resume: bool) -> dict:
    """What the checkpoint writers need from a sharded model, as full tensors: {"weights": the checkpoint's
    state dict, "trainable": the resume weights, "optimizer": the resume optimizer state}. Every process
    calls it (each gather is a collective); only process 0 writes. Empty for an unsharded model."""
    if not is_sharded(model):
        return {}
    out = {}
    if weights or resume:
        out["trainable"] = gather_trainable(model)
    if weights:
        out["weights"] = out["trainable"] if peft else gather_full(model)
    if resume:
        out["optimizer"] = gather_optimizer(model, optimizer)
    return out


def check_run(cfg, sharding: Sharding, method) -> None:
    """Refuse, before any weight loads, what a sharded run cannot do (rather than hang or write wrong files)."""
    if sharding.kind != "fsdp":
        return
    if cfg.quantization.enabled:
        raise SftlabError("distributed: FSDP does not shard a quantized base in sftlab; launch with plain DDP "
                          "(distributed.strategy=ddp, no FSDP/DeepSpeed accelerate config) or quantization.bits=none")
    if method.peft and method.merge is None:
        raise SftlabError(f"distributed: method {method.name!r} (virtual tokens) is not supported with FSDP; use "
                          "distributed.strategy=ddp")
    if cfg.probes and cfg.scoring.during_training:
        raise SftlabError("distributed: scoring during training runs on process 0 alone, which a sharded model "
                          "cannot do; set scoring.during_training=false and score the checkpoints afterwards "
                          "(sftlab eval RUN)")
