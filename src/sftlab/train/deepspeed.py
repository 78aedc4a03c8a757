"""DeepSpeed ZeRO-2/3 configs (Rajbhandari et al. 2020), read and run as the equivalent FSDP2 sharding.

ZeRO-3 partitions parameters, gradients and optimizer states, gathering each layer's parameters for its
forward and backward: that is FSDP2 with resharding after forward. ZeRO-2 keeps parameters whole and
partitions gradients and optimizer states; the nearest FSDP2 setting keeps the gathered parameters from
forward until backward (reshard_after_forward=false): same communication pattern, lower peak memory than
DDP, more than ZeRO-2 between steps. Offload to CPU maps to FSDP2's CPU offload (parameters, gradients and
optimizer states together). The DeepSpeed engine itself is never imported, so no deepspeed install is needed.

Values sftlab sets elsewhere ('auto' in the config, as with the HF Trainer) are filled from the train
section; a value that disagrees with it is refused, so the config file cannot silently mean something else.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SftlabError
from .shardspec import Sharding

# Keys that only change DeepSpeed's own logging or kernels: read, nothing to do.
IGNORED = {"steps_per_print", "wall_clock_breakdown", "flops_profiler", "tensorboard", "comms_logger",
           "zero_allow_untested_optimizer", "communication_data_type", "prescale_gradients", "dump_state"}
HANDLED = {"zero_optimization", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
           "train_batch_size", "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"}


def load_config(path: str) -> dict:
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SftlabError(f"distributed.deepspeed_config: {p} not found") from None
    except (OSError, ValueError) as e:
        raise SftlabError(f"distributed.deepspeed_config: {p} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise SftlabError(f"distributed.deepspeed_config: {p} must hold a JSON object")
    return data


def _agree(ds: dict, key: str, ours, what: str, where: str) -> None:
    value = ds.get(key, "auto")
    if value != "auto" and value != ours:
        raise SftlabError(f"{where}: {key} is {value!r} but {what} is {ours!r}; set it to \"auto\" (sftlab fills "
                          f"it in) or change {what}")


def to_sharding(ds: dict, train, world: int, where: str) -> Sharding:
    """Check a DeepSpeed config against the train section and translate it to FSDP2 settings."""
    unknown = sorted(set(ds) - IGNORED - HANDLED)
    if unknown:
        raise SftlabError(f"{where}: sftlab does not run {', '.join(unknown)} (it runs ZeRO stages 2/3 as FSDP2); "
                          "remove them")
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        raise SftlabError(f"{where}: zero_optimization.stage is {stage!r}; sftlab runs stages 2 and 3 (sharded), "
                          "for no sharding use distributed.strategy=ddp")
    _agree(ds, "train_micro_batch_size_per_gpu", train.batch_size, "train.batch_size", where)
    _agree(ds, "gradient_accumulation_steps", train.grad_accum, "train.grad_accum", where)
    _agree(ds, "train_batch_size", train.batch_size * train.grad_accum * world,
           f"train.batch_size x train.grad_accum x {world} processes", where)
    _agree(ds, "gradient_clipping", train.max_grad_norm, "train.max_grad_norm", where)
    _check_precision(ds, train, where)
    _check_optimizer(ds, train, where)
    offload = [zero.get(k, {}).get("device", "none") for k in ("offload_param", "offload_optimizer")]
    if "nvme" in offload:
        raise SftlabError(f"{where}: offload to nvme is not supported; use \"cpu\" or \"none\"")
    return Sharding("fsdp", reshard_after_forward=stage == 3, cpu_offload="cpu" in offload,
                    source=f"DeepSpeed ZeRO-{stage} config {where}")


def _check_precision(ds: dict, train, where: str) -> None:
    if (ds.get("fp16") or {}).get("enabled") is True:
        raise SftlabError(f"{where}: fp16 with loss scaling is not supported; use bf16 (train.precision=bf16)")
    bf16 = (ds.get("bf16") or {}).get("enabled", "auto")
    if bf16 != "auto" and bool(bf16) != (train.precision == "bf16"):
        raise SftlabError(f"{where}: bf16.enabled is {bf16!r} but train.precision is {train.precision!r}; set it to "
                          "\"auto\" or make them agree")


def _check_optimizer(ds: dict, train, where: str) -> None:
    opt = ds.get("optimizer")
    if opt is not None:
        if str(opt.get("type", "")).lower() not in ("adam", "adamw"):
            raise SftlabError(f"{where}: optimizer {opt.get('type')!r}; sftlab trains with AdamW (remove the "
                              "optimizer block or use AdamW)")
        params = opt.get("params") or {}
        _agree(params, "lr", train.lr, "train.lr", where)
        _agree(params, "weight_decay", train.weight_decay, "train.weight_decay", where)
        betas = params.get("betas", "auto")
        if betas != "auto" and list(betas) != list(train.betas):
            raise SftlabError(f"{where}: optimizer betas {betas} but train.betas is {train.betas}")
    sched = ds.get("scheduler")
    if sched is not None:
        raise SftlabError(f"{where}: the scheduler block is not used; set train.schedule and train.warmup instead "
                          "and remove it")


def sharding_from_accelerate_env(env, train, world: int) -> Sharding:
    """`accelerate launch` with a deepspeed_config: its JSON file, or the ZeRO settings from its YAML."""
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path.lower() != "none":
        return to_sharding(load_config(path), train, world, path)
    ds = {"zero_optimization": {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")),
                                "offload_param": {"device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                                                                    "none")},
                                "offload_optimizer": {"device": env.get(
                                    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")}}}
    accum = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accum:
        ds["gradient_accumulation_steps"] = int(accum)
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clip and clip.lower() != "none":
        ds["gradient_clipping"] = float(clip)
    return to_sharding(ds, train, world, "accelerate deepspeed_config")
