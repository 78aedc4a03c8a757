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
from .base import Method, peft_wrap, register_method, targets


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
                    task_type="CAUSAL_LM")
    return peft_wrap(model, cfg, token_indices)


register_method(Method("oft", OFTOptions, apply, "orthogonal fine-tuning (exact Cayley rotations by default)",
                       merge="rotation", token_rows=True))
