"""BOFT (Liu et al. 2024): orthogonal fine-tuning with butterfly-factorised rotations."""

from dataclasses import dataclass

from ..configtools import check, doc
from ..errors import SftlabError
from .base import Method, peft_wrap, register_method, targets


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
                     layers_to_transform=o.layers, task_type="CAUSAL_LM")
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


register_method(Method("boft", BOFTOptions, apply, "butterfly orthogonal fine-tuning", merge="rotation",
                       load_context=pytorch_path, token_rows=True))
