"""BOFT (Liu et al. 2024): orthogonal fine-tuning with butterfly-factorised rotations."""

from dataclasses import dataclass

from ..configtools import check, doc
from ..errors import SftlabError
from .base import Method, peft_wrap, register_method, scope_exclude, targets
from .budget_rules import (BudgetError, BudgetRule, Family, ModelShape, describe_rotation, divisors, knob,
                           layer_choices, layer_count, linear_only, module_choices, module_names, tier, with_layers)
from .merge import ROTATION


@dataclass
class BOFTOptions:
    block_size: int = doc("size of each butterfly block (must divide the layers' input size)", default=8)
    n_butterfly_factor: int = doc("number of butterfly factors (1 = plain block-diagonal OFT)", default=1)
    target_modules: list[str] = doc("modules to rotate; ['all-linear'] = every linear layer but the head",
                                    default_factory=lambda: ["all-linear"])
    dropout: float = doc("multiplicative dropout on the butterfly blocks", default=0.0)
    layers: list[int] | None = doc("only these layer indices (null: all layers)", default=None)
    cuda_kernel: bool = doc("let PEFT compile its CUDA block-diagonal kernel (needs nvcc and ninja; off: the "
                            "PyTorch path, the same result)", default=False)

    def __post_init__(self):
        check(self.block_size >= 2, "method.block_size", f"must be >= 2, got {self.block_size}")
        check(self.n_butterfly_factor >= 1, "method.n_butterfly_factor", "must be >= 1")


_NO_KERNEL = ("method.n_butterfly_factor: PEFT runs more than one butterfly factor only with its CUDA kernel; "
              "use method.n_butterfly_factor=1, or ")


def apply(model, o: BOFTOptions, token_indices: dict[str, list[int]] | None = None):
    import torch
    from peft import BOFTConfig
    from peft.tuners.boft import layer as boft_layer

    cfg = BOFTConfig(boft_block_size=o.block_size, boft_n_butterfly_factor=o.n_butterfly_factor,
                     target_modules=targets(o.target_modules), boft_dropout=o.dropout,
                     layers_to_transform=o.layers, exclude_modules=scope_exclude(model), task_type="CAUSAL_LM")
    if o.cuda_kernel and torch.cuda.is_available():
        if o.n_butterfly_factor > 1 and boft_layer.get_fbd_cuda() is None:
            raise SftlabError(_NO_KERNEL + "PEFT's CUDA kernel failed to build here (needs nvcc and ninja)")
        return peft_wrap(model, cfg, token_indices)
    if o.n_butterfly_factor > 1:
        # PEFT would silently train with one factor and still record the one asked for.
        raise SftlabError(_NO_KERNEL + "set method.cuda_kernel=true on a CUDA machine with nvcc and ninja")
    # Otherwise PEFT tries to compile its CUDA kernel anyway - on a GPU machine ~40 s that can end in a
    # failed build, and without CUDA once per adapted layer, since a failure is not cached - warning each
    # time, then runs the pure-PyTorch path. Go to that path directly.
    with pytorch_path():
        return peft_wrap(model, cfg, token_indices)


def pytorch_path():
    """Make PEFT use BOFT's PyTorch path without first trying to compile its CUDA kernel."""
    from unittest import mock

    from peft.tuners.boft import layer as boft_layer

    return mock.patch.object(boft_layer, "get_fbd_cuda", return_value=None)


def fits(n_in: int, b: int, m: int) -> bool:
    """PEFT's BOFT constraints for m butterfly factors: 2^(m-1) blocks per butterfly, even blocks then."""
    if n_in % b:
        return False
    return m == 1 or (b % 2 == 0 and (n_in // b) % 2 == 0 and n_in % (b * 2 ** (m - 1)) == 0)


def count(shape: ModelShape, o) -> int:
    # m factors of in/b full b x b blocks (boft_R) plus an output scale vector (boft_s) per module.
    per_layer = 0
    names = module_names(o.target_modules, shape)
    linear_only(shape, names, "BOFT")
    for name in names:
        n_in, n_out = shape.linear(name)
        if not fits(n_in, o.block_size, o.n_butterfly_factor):
            raise BudgetError(f"budget: block_size {o.block_size} with {o.n_butterfly_factor} butterfly factor(s) "
                              f"does not fit {name}'s {n_in} inputs")
        per_layer += o.n_butterfly_factor * n_in * o.block_size + n_out
    return per_layer * layer_count(shape, o.layers)


def candidates(shape, o, pinned, search):
    # More than one butterfly factor needs PEFT's CUDA kernel (see apply): searched only when it is on.
    factors = knob(pinned, "n_butterfly_factor", o.n_butterfly_factor,
                   range(1, 5) if o.cuda_kernel else [o.n_butterfly_factor])
    for mods, m_changed in module_choices(pinned, o.target_modules, shape=shape):
        ins = [shape.linear(n)[0] for n in module_names(mods, shape)]
        for layers, l_changed in layer_choices(shape, pinned, o.layers, search):
            for m in factors:
                sizes = [b for b in divisors(min(ins)) if b >= 2 and all(fits(i, b, m) for i in ins)]
                fixed = {"target_modules": with_layers(mods, layers, shape), "layers": layers}
                if m != 1 or "n_butterfly_factor" in pinned:
                    fixed["n_butterfly_factor"] = m
                yield Family(tier(m_changed, l_changed), fixed, "block_size",
                             knob(pinned, "block_size", o.block_size, sizes))


# Not in the demo's sweep: OFT's rate (the same rotations, butterfly-factored).
register_method(Method("boft", BOFTOptions, apply, "butterfly orthogonal fine-tuning", merge=ROTATION,
                       load_context=pytorch_path, token_rows=True,
                       budget=BudgetRule(count, candidates, describe_rotation), default_lr=1e-2))
