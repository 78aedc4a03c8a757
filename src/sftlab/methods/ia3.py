"""IA3 (Liu et al. 2022): learned rescaling vectors on keys, values and the MLP input."""

import dataclasses
from dataclasses import dataclass

from ..configtools import check, doc
from .base import Method, peft_wrap, register_method, scope_exclude, targets
from .budget_rules import (BudgetError, BudgetRule, Family, ModelShape, layer_choices, layer_count, layers_label,
                           module_choices, module_names, module_sets, modules_label, projections, tier)

# PEFT's IA3 defaults for the Llama family (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING): targets, feed-forward.
DEFAULT = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
DEFAULTS = {"gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"])}  # where PEFT's differ


@dataclass
class IA3Options:
    target_modules: list[str] | None = doc("modules to rescale (null: PEFT's default for the architecture)",
                                           default=None)
    feedforward_modules: list[str] | None = doc("which of target_modules are feed-forward (scaled on input; "
                                                "null: PEFT's default for the architecture, []: none)",
                                                default=None)
    layers: list[int] | None = doc("only these layer indices (null: all layers)", default=None)

    def __post_init__(self):
        check(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0), "method.layers",
              "give a non-empty list of layer indices >= 0, or null for all layers")


def other_layers(layers: list[int]) -> str:
    """A regex for every module inside a decoder layer NOT in `layers`.

    PEFT's IA3Config has no layers_to_transform (LoRA/OFT/BOFT have it), but every tuner honours
    exclude_modules, matched with re.fullmatch against names like 'model.layers.7.mlp.down_proj'; the
    layer containers are named as in PEFT's own layers_pattern default."""
    keep = "|".join(str(i) for i in sorted(set(layers)))
    return rf".*\.(?:layers|h|blocks|layer)\.(?!(?:{keep})\.)\d+\..*"


def apply(model, o: IA3Options, token_indices: dict[str, list[int]] | None = None):
    from peft import IA3Config

    cfg = IA3Config(task_type="CAUSAL_LM",
                    target_modules=targets(o.target_modules) if o.target_modules else None,
                    feedforward_modules=list(o.feedforward_modules) if o.feedforward_modules is not None else None,
                    exclude_modules=scope_exclude(model, other_layers(o.layers) if o.layers is not None else None))
    return peft_wrap(model, cfg, token_indices)


def default_modules(shape: ModelShape) -> tuple[list[str], list[str]]:
    if shape.source == "config":  # a Llama-family layout: no need to import PEFT
        return DEFAULTS.get(shape.model_type, DEFAULT)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    if shape.model_type not in TARGETS:  # PEFT refuses the same (it has no default to apply)
        raise BudgetError(f"budget: PEFT has no default IA3 modules for {shape.model_type}; set "
                          "method.target_modules (and feedforward_modules)")
    return list(TARGETS[shape.model_type]), list(FEEDFORWARD.get(shape.model_type, []))


def modules(o, shape: ModelShape | None = None) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets) as PEFT will resolve them (its defaults for the architecture when unset)."""
    def default():  # PEFT's, asked only when a field is unset (a layout PEFT has none for is refused then)
        return default_modules(shape) if shape is not None else DEFAULT

    targets = module_names(o.target_modules, shape) if o.target_modules else default()[0]
    if o.feedforward_modules is None:
        return targets, default()[1]
    return targets, module_names(o.feedforward_modules, shape) if o.feedforward_modules else []


def count(shape: ModelShape, o) -> int:
    # One vector per module: over the input for feed-forward modules, over the output otherwise.
    targets, ff = modules(o, shape)
    per_layer = sum(shape.linear(n)[0 if n in ff else 1] for n in targets)
    return per_layer * layer_count(shape, o.layers)


def candidates(shape, o, pinned, search):
    for mods, m_changed in module_choices(pinned, o.target_modules, search_start(shape), explicit=True,
                                          shape=shape):
        ff = o.feedforward_modules if "feedforward_modules" in pinned else inner(shape, mods)
        for layers, l_changed in layer_choices(shape, pinned, o.layers, search):
            yield Family(tier(m_changed, l_changed), {"target_modules": mods, "feedforward_modules": ff,
                                                      "layers": layers})


def search_start(shape: ModelShape) -> list[str]:
    """The modules a search starts from: PEFT's default for the architecture, else for a VLM's text model
    (LLaVA's Llama), else every linear (Phi-3). Candidates name their modules, so PEFT needs no default."""
    for kind in (shape.model_type, shape.text_model_type):
        try:
            return default_modules(dataclasses.replace(shape, model_type=kind))[0]
        except BudgetError:
            continue
    return list(projections(shape))


def inner(shape: ModelShape, mods) -> list[str]:
    """The modules IA3 scales on their input: the MLP's inner activation, the input of its down projection
    (Liu et al. 2022) - the MLP's linears that narrow (down_proj, GPT-2's mlp.c_proj). Named explicitly ([] when
    there is none) so that PEFT needs no default for the architecture."""
    mlp = set(module_sets(shape).get("mlp", ()))
    return [n for n in module_names(mods, shape) if n in mlp and shape.linear(n)[0] > shape.linear(n)[1]]


def describe(shape, o) -> str:
    targets, ff = modules(o, shape)
    return f"vectors on {modules_label(targets, shape=shape)} (input side: {'+'.join(ff) or 'none'}), " \
           f"{layers_label(shape, o.layers)}"


# Not in the demo's sweep: a starting point (rescaling vectors need high rates; tests use 1e-1 on tiny models).
register_method(Method("ia3", IA3Options, apply, "IA3 rescaling vectors", token_rows=True,
                       budget=BudgetRule(count, candidates, describe), default_lr=1e-2))
