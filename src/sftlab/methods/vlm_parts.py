"""The parts of a vision-language model that may train: language model, projector, vision tower (vision.train).

- language: the language model (base.language_scope: the outermost module built from the text config) and the
  output head;
- vision: the vision tower, the outermost module built from the vision config (LLaVA's vision_tower,
  Idefics3's vision_model, Qwen2-VL's visual), less the projector inside it;
- projector: what maps image features into the language model's embeddings: LLaVA's multi_modal_projector,
  Idefics3's connector, and Qwen2-VL's patch merger (visual.merger, inside the vision module).

Full fine-tuning trains the listed parts' weights (`freeze_outside`); adapter methods put their adapters on the
listed parts' linear layers (base.scope_exclude reads `model.sftlab_train_parts`, set by `select`). By default
only the language model trains: the vision tower stays as pretrained.
"""

from __future__ import annotations

import re

PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector", "projector")
ATTRIBUTE = "sftlab_train_parts"


def language_scope(model) -> str:
    """The module path of a vision-language model's language model ('model.language_model'); '' for a text
    model. By default adapters train only the language model, and the budget solver counts only it
    (model_walk.py)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config") or config.get_text_config() is config:
        return ""
    text = config.get_text_config()
    # The language model is the outermost module built from the text config (LLaVA, Qwen2-VL and Gemma-3 call
    # it language_model, Idefics3 text_model); its layers share that config, hence the outermost.
    names = [n for n, m in model.named_modules() if n and getattr(m, "config", None) is text]
    names = names or [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("language_model", "text_model")]
    return min(names, key=len) if names else ""


def vision_scope(model) -> str:
    """The module path of the vision tower ('' when there is none)."""
    vc = getattr(getattr(model, "config", None), "vision_config", None)
    names = [n for n, m in model.named_modules() if n and vc is not None and getattr(m, "config", None) is vc]
    names = names or [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("vision_tower", "vision_model",
                                                                                         "visual")]
    return min(names, key=len) if names else ""


def part_scopes(model) -> dict[str, list[str]]:
    """{part: module paths}: the language model (and the head), the vision tower, the projector(s)."""
    language, vision = language_scope(model), vision_scope(model)
    projector = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in PROJECTOR_NAMES and not (language and name.startswith(language + ".")):
            if not any(name.startswith(p + ".") for p in projector):
                projector.append(name)
    head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    return {"language": [language] + head if language else head, "vision": [vision] if vision else [],
            "projector": projector}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def part_of(name: str, scopes: dict[str, list[str]]) -> str:
    """The part a parameter or module belongs to: the projector first (Qwen2-VL's merger sits inside its vision
    module), then the vision tower; everything else is the language side."""
    if _under(name, scopes["projector"]):
        return "projector"
    if _under(name, scopes["vision"]):
        return "vision"
    return "language"


def is_vlm(model) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(config, "vision_config", None) is not None and bool(language_scope(model))


def select(model, parts: list[str]) -> None:
    """Record which parts train on the model (read by base.scope_exclude when an adapter method is applied)."""
    setattr(model, ATTRIBUTE, tuple(parts))


def freeze_outside(model, parts: list[str]) -> None:
    """Full fine-tuning: the parameters of parts not listed stop requiring gradients."""
    scopes = part_scopes(model)
    for name, p in model.named_parameters():
        if part_of(name, scopes) not in parts:
            p.requires_grad_(False)


def trainable_by_part(model) -> dict[str, int]:
    """Trainable parameters per part (for provenance), counted on the (maybe wrapped) model's own names."""
    from ..objectives import unwrap

    base = unwrap(model)
    scopes = part_scopes(base)
    names = {id(p): n for n, p in base.named_parameters()}
    out = {"language": 0, "projector": 0, "vision": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            own = names.get(id(p), _base_name(name))
            out[part_of(own, scopes)] += p.numel()
    return out


def _base_name(name: str) -> str:
    """A PEFT-wrapped parameter's path in the base model (adapter weights sit inside the module they adapt)."""
    return re.sub(r"^base_model\.model\.", "", name)


def scope_exclude(model, extra: str | None = None) -> str | None:
    """PEFT exclude_modules (a regex, matched with re.fullmatch against module names) that keeps a VLM's
    adapters on its selected parts (by default the language model alone): its vision tower and projector have
    q_proj, fc1... too, and all-linear names them all. `extra`: another regex of modules to exclude (IA3's
    layers). None: nothing to exclude."""
    alts = [a for a in (_outside_parts(model), extra) if a]
    return "|".join(f"(?:{a})" for a in alts) if alts else None


def _outside_parts(model) -> str | None:
    if not is_vlm(model):
        return None
    parts = getattr(model, ATTRIBUTE, ("language",))
    scopes = part_scopes(model)
    scopes["language"] = scopes["language"][:1]  # the language model; the output head is never adapted
    allowed = [p for part in parts for p in scopes[part] if p]
    # a part nested in an allowed one but not selected itself (Qwen2-VL's merger inside its vision module)
    nested = [p for part in ("projector", "vision") if part not in parts for p in scopes[part]
              if _under(p, allowed) and p not in allowed]
    alts = [rf"(?!(?:{'|'.join(re.escape(a) for a in allowed)})(?:\.|$)).*"] if allowed else [".*"]
    alts += [rf"{re.escape(n)}(?:\..*)?" for n in nested]
    return "|".join(f"(?:{a})" for a in alts)
