"""Config sections for scale: a quantized base (bitsandbytes) and sharded training (FSDP2).

Torch-free like the rest of the config, so a bad value fails before anything heavy loads. The sections
sit in RunConfig as `quantization:` and `distributed:`; config.py checks them against the other sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .configtools import check, doc


@dataclass
class QuantizationSection:
    """`quantization: {bits: 4, quant_type: nf4, double_quant: true}`: QLoRA (Dettmers et al. 2023).

    The base weights are stored in 4 or 8 bits by bitsandbytes and stay frozen; an adapter method trains on
    top in full precision. W0 of such a run (for rewinding, interpolation, analysis and KL-to-base) is the
    dequantized base: the weights the adapter was trained against, not the full-precision originals."""

    bits: Literal["none", 4, 8] = doc(
        "store the frozen base in 4 bits (QLoRA), 8 bits (LLM.int8) or not at all (none); needs bitsandbytes "
        "(pip install 'bitsandbytes>=0.46'; CPU works from 0.46, GPUs need its CUDA build)", default="none")
    quant_type: Literal["nf4", "fp4"] = doc("4-bit data type: nf4 (normal float, the QLoRA default) or fp4",
                                            default="nf4")
    double_quant: bool = doc("4-bit: quantize the quantization constants too (saves ~0.4 bit per weight)",
                             default=False)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "dtype the 4-bit weights are dequantized to for each matmul; auto: model.dtype", default="auto")

    @property
    def enabled(self) -> bool:
        return self.bits != "none"

    def __post_init__(self):
        check(self.bits != 8 or (self.quant_type == "nf4" and not self.double_quant), "quantization.quant_type",
              "quant_type and double_quant apply to 4-bit bases; leave them at their defaults with bits: 8")


@dataclass
class DistributedSection:
    """`distributed: {strategy: fsdp}`: how several processes (torchrun / accelerate launch) share the work."""

    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = doc(
        "ddp: each process holds the whole model; fsdp: parameters, gradients and optimizer states sharded "
        "with torch FSDP2 (fully_shard); deepspeed: a DeepSpeed ZeRO-2/3 config (deepspeed_config), run on "
        "FSDP2 with the same sharding; auto: what `accelerate launch --config_file` asked for (its FSDP or "
        "DeepSpeed settings), else ddp. One process: no sharding whatever this says", default="auto")
    reshard_after_forward: bool = doc(
        "fsdp: free each layer's gathered weights after its forward (ZeRO-3, least memory) or keep them "
        "until backward (ZeRO-2-like, less communication)", default=True)
    cpu_offload: bool = doc("fsdp: keep sharded parameters, gradients and optimizer states in CPU memory "
                            "(GPU training only)", default=False)
    activation_checkpointing: bool = doc(
        "fsdp: recompute each layer's activations in backward (the same as train.gradient_checkpointing)",
        default=False)
    deepspeed_config: str = doc(
        "deepspeed: a DeepSpeed JSON config (zero_optimization.stage 2 or 3); 'auto' values are filled from "
        "the train section, others must agree with it", default="")

    def __post_init__(self):
        check(not self.deepspeed_config or self.strategy in ("auto", "deepspeed"), "distributed.deepspeed_config",
              f"is read only with strategy deepspeed (or auto); strategy is {self.strategy!r}")
