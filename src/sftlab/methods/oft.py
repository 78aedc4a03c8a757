"""OFT (Qiu et al. 2023; Liu et al. 2024 'OFTv2'): block-diagonal orthogonal rotations of each weight's input.

By default each block is the exact Cayley transform of a skew-symmetric S: PEFT (0.21) computes
R = (I - S)(I + S)^-1, so the learned matrices are true rotations (rewinding scales S and stays on the
rotation group). The Neumann series approximation is faster but only approximately orthogonal: opt in
with `neumann: true`. Beware that PEFT's Neumann branch approximates (I + S)(I - S)^-1, the transpose
of the exact one, so the same S gives R with one setting and R^T with the other: never switch the
setting for a trained adapter (its adapter_config.json records it as use_cayley_neumann).
"""

from dataclasses import dataclass

from ..configtools import check, doc
from .base import Method, peft_wrap, register_method, scope_exclude, targets
from .budget_rules import (BudgetError, BudgetRule, Family, ModelShape, describe_rotation, divisors, knob,
                           layer_choices, layer_count, linear_only, module_choices, module_names, tier, with_layers)
from .merge import ROTATION


@dataclass
class OFTOptions:
    block_size: int = doc("size of each orthogonal block (must divide the layers' input size)", default=32)
    target_modules: list[str] = doc("modules to rotate; ['all-linear'] = every linear layer but the head",
                                    default_factory=lambda: ["all-linear"])
    neumann: bool = doc("approximate the Cayley inverse by a Neumann series (faster, not exactly orthogonal)",
                        default=False)
    neumann_terms: int = doc("terms of that series", default=5)
    dropout: float = doc("multiplicative dropout on the rotation blocks", default=0.0)
    block_share: bool = doc("share one rotation across a layer's blocks", default=False)
    layers: list[int] | None = doc("only these layer indices (null: all layers)", default=None)

    def __post_init__(self):
        check(self.block_size >= 2, "method.block_size", f"must be >= 2, got {self.block_size}")
        check(0.0 <= self.dropout < 1.0, "method.dropout", "must be in [0, 1)")


def apply(model, o: OFTOptions, token_indices: dict[str, list[int]] | None = None):
    from peft import OFTConfig

    cfg = OFTConfig(r=0, oft_block_size=o.block_size, target_modules=targets(o.target_modules),
                    use_cayley_neumann=o.neumann, num_cayley_neumann_terms=o.neumann_terms,
                    module_dropout=o.dropout, block_share=o.block_share, layers_to_transform=o.layers,
                    exclude_modules=scope_exclude(model), task_type="CAUSAL_LM")
    return peft_wrap(model, cfg, token_indices)


def check_block(shape: ModelShape, names: list[str], b: int) -> None:
    linear_only(shape, names, "OFT")
    # PEFT's OFT silently changes a block size that does not divide a layer's input; refuse it instead.
    for name in names:
        n_in = shape.linear(name)[0]
        if n_in % b:
            raise BudgetError(f"budget: block_size {b} does not divide {name}'s {n_in} inputs")


def count(shape: ModelShape, o) -> int:
    # in/b blocks per module, each a skew-symmetric b x b generator stored as its b(b-1)/2 free entries.
    names = module_names(o.target_modules, shape)
    check_block(shape, names, o.block_size)
    tri = o.block_size * (o.block_size - 1) // 2
    per_layer = sum((1 if o.block_share else shape.linear(n)[0] // o.block_size) * tri for n in names)
    return per_layer * layer_count(shape, o.layers)


def candidates(shape, o, pinned, search):
    for mods, m_changed in module_choices(pinned, o.target_modules, shape=shape):
        ins = [shape.linear(n)[0] for n in module_names(mods, shape)]
        sizes = [b for b in divisors(min(ins)) if b >= 2 and all(i % b == 0 for i in ins)]
        for layers, l_changed in layer_choices(shape, pinned, o.layers, search):
            fixed = {"target_modules": with_layers(mods, layers, shape), "layers": layers}
            yield Family(tier(m_changed, l_changed), fixed, "block_size",
                         knob(pinned, "block_size", o.block_size, sizes))


register_method(Method("oft", OFTOptions, apply, "orthogonal fine-tuning (exact Cayley rotations by default)",
                       merge=ROTATION, token_rows=True, budget=BudgetRule(count, candidates, describe_rotation),
                       default_lr=1e-3))
