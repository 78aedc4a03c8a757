"""A vision-language model through the one training loop (issue 18): its processor, what trains, its batches.

The loop stays the same: the processor tokenizes the data (data/multimodal.py), each batch carries the image
processor's tensors (pixel_values, image_grid_thw, pixel_attention_mask, ...) beside input_ids, and the forward
pass hands them to the model. What this adds: the checks that refuse what does not work with images, the
choice of trained parts (vision.train, methods/vlm_parts.py) and what provenance.json records about it.
"""

from __future__ import annotations

from functools import partial

from ..data.multimodal import vision_batch
from ..errors import ModelError
from ..methods import vlm_parts
from ..models import is_vision_language, load_processor


def load(cfg, ref, method) -> object | None:
    """The processor of a vision-language base (None for a text model), after the checks that refuse what does
    not combine with one."""
    if not is_vision_language(ref.location):
        if not cfg.vision.is_default():
            raise ModelError(f"vision: {ref.spec} is a text-only model; the vision section applies to "
                             "vision-language models: remove it")
        return None
    if cfg.data.packing:
        raise ModelError("data.packing: rows with images are not packed (their image tokens and position ids are "
                         "per row); set data.packing=false")
    if not method.packing:
        raise ModelError(f"method.name: {method.name!r} prepends virtual tokens, which sftlab does not support on "
                         "vision-language models yet; use full, lora, dora, oft, boft or ia3")
    if cfg.objective.name != "sft":
        raise ModelError(f"objective.name: {cfg.objective.name} on vision-language models is not supported yet; "
                         "use objective.name=sft")
    proc = load_processor(ref, cfg.model.trust_remote_code, cfg.model.revision)
    proc.sftlab_max_pixels = cfg.vision.max_image_pixels  # the probes' image limit too (probes/likelihood.py)
    return proc


def apply_method(method, model, cfg, processor, **kw):
    """The method applied to the model; on a VLM (`processor` set) only the parts in vision.train train: adapters go
    on their linears (vlm_parts.select, read by scope_exclude), full fine-tuning freezes the other parts."""
    if processor is None:
        return method.apply(model, cfg.method.options, **kw)
    if not vlm_parts.is_vlm(model):
        raise ModelError(f"model.path: {cfg.model.path} loaded as {type(model).__name__}, whose language model "
                         "sftlab cannot find; use a transformers image-text-to-text model")
    vlm_parts.select(model, cfg.vision.train)
    model = method.apply(model, cfg.method.options, **kw)
    if not method.peft:
        vlm_parts.freeze_outside(model, cfg.vision.train)
    return model


def provenance(model, cfg, processor) -> dict:
    return {"vision": {"train": list(cfg.vision.train), "trainable_by_part": vlm_parts.trainable_by_part(model),
                       "processor": type(processor).__name__,
                       "image_processor": type(processor.image_processor).__name__,
                       "max_image_pixels": cfg.vision.max_image_pixels}}


def batch_maker(processor, cfg):
    """collate's `vision`: a batch's image tensors from its rows' images (None for a text model)."""
    return partial(vision_batch, processor, max_pixels=cfg.vision.max_image_pixels) if processor is not None else None
