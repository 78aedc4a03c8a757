"""What sharding a process group uses, as plain data. sharding.py makes one from the config or accelerate's
FSDP settings and calls deepspeed.py for a DeepSpeed ZeRO config; deepspeed.py builds it from here, so it
needs nothing from sharding.py (no import circle)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sharding:
    kind: str = "none"  # "none" (one process) | "ddp" | "fsdp"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    source: str = "config"  # where the settings came from, for the log line and provenance
    wrap_classes: tuple[str, ...] = ()  # decoder-layer class names to shard one by one (empty: the model's own)

    def describe(self) -> str:
        if self.kind != "fsdp":
            return self.kind
        return (f"fsdp2 (reshard_after_forward={self.reshard_after_forward}, cpu_offload={self.cpu_offload}, "
                f"activation_checkpointing={self.activation_checkpointing}; from {self.source})")
