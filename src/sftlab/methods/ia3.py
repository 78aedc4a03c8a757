"""IA3 (Liu et al. 2022): learned rescaling vectors on keys, values and the MLP input."""

from dataclasses import dataclass

from ..configtools import check, doc
from .base import Method, peft_wrap, register_method, targets


@dataclass
class IA3Options:
    target_modules: list[str] | None = doc("modules to rescale (null: PEFT's default for the architecture)",
                                           default=None)
    feedforward_modules: list[str] | None = doc("which of target_modules are feed-forward (scaled on input)",
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
                    feedforward_modules=list(o.feedforward_modules) if o.feedforward_modules else None,
                    exclude_modules=other_layers(o.layers) if o.layers is not None else None)
    return peft_wrap(model, cfg, token_indices)


register_method(Method("ia3", IA3Options, apply, "IA3 rescaling vectors", token_rows=True))
