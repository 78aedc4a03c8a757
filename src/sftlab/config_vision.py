"""The `vision:` section: what trains in a vision-language model, and the limits on its images (issue 18).

Torch-free like the rest of the config. It applies only when model.path is a vision-language model (its
config.json has a vision_config); a text model with a non-default section is refused when the run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .configtools import check, doc

PARTS = ("language", "projector", "vision")
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass
class VisionSection:
    """`vision: {train: [language, projector], max_image_pixels: 1048576}`."""

    train: list[Literal["language", "projector", "vision"]] = doc(
        "what trains in a vision-language model: its language model, the projector between vision and language "
        "(LLaVA's multi_modal_projector, Idefics3's connector, Qwen2-VL's merger) and/or the vision tower (frozen "
        "unless listed). Full fine-tuning trains these parts' weights; adapter methods put their adapters on these "
        "parts' linear layers. Recorded in provenance.json", default_factory=lambda: ["language"])
    max_image_pixels: int = doc(
        "refuse an image with more pixels than this (width x height, read from its header before decoding); "
        "0: no limit", default=DEFAULT_MAX_PIXELS)

    def __post_init__(self):
        check(bool(self.train), "vision.train", "name at least one part: language, projector or vision")
        dup = sorted({p for p in self.train if self.train.count(p) > 1})
        check(not dup, "vision.train", f"{dup[0] if dup else ''!r} is listed twice")
        check(self.max_image_pixels >= 0, "vision.max_image_pixels", "must be >= 0 (0: no limit)")

    def is_default(self) -> bool:
        return self == VisionSection()

