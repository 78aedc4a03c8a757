"""Quantized bases through bitsandbytes: 4-bit NF4/FP4 (QLoRA, Dettmers et al. 2023) and 8-bit (LLM.int8,
Dettmers et al. 2022).

The quantized weights are frozen; an adapter trains on top in full precision. Everything that needs W0 as a
tensor (rewinding, interpolation, export, weight analysis, KL-to-base) loads the base the same way and
dequantizes it: W0 = dequant(quant(W)), the weights the adapter was trained against. For 4-bit that is the
function the run trained (bitsandbytes dequantizes the block and runs a float matmul); for 8-bit it is close
but not exact, as LLM.int8 also rounds the activations to int8 in each matmul.

Three things keep a quantized run honest:

- bitsandbytes is imported only for a quantized base. peft imports it whenever it is installed (and
  bitsandbytes then logs a line about an optional CPU kernel on every `sftlab train`); `hide_bitsandbytes`
  makes it look absent to peft and transformers until `import_bitsandbytes` asks for it, which files its
  import-time log lines under the `sftlab.quantize` logger (debug) instead of the run's output.
- The training layout stays (`keep_training_layout`). On a CPU with AVX512-BF16, bitsandbytes >= 0.49
  repacks a Linear4bit's weight into an inference layout the first time the layer runs in eval mode without
  grad (`quant_state.packing_format_for_cpu`), and from then on `matmul_4bit` calls `gemv_4bit`, which has
  no backward: gradients stop at every frozen 4-bit layer and each adapter learns only through the residual
  stream. sftlab scores in eval mode (step 0, every checkpoint), so a run stopped learning at step 0. sftlab
  turns the repack off on every 4-bit layer of a model it trains (and undoes one already done); scoring then
  takes bitsandbytes' dequantize + matmul path, the one training takes. Undoing the repack after each
  scoring pass instead would not be exact: the repack rounds the block scales to bfloat16 and re-quantizes
  them on the way back. GPUs have no such layout (gemv_4bit there only serves no-grad calls), and 8-bit
  layers keep one layout in both modes (CPU training dequantizes int8 -> float for the matmul).
- A guard (`check_gradients`, run before training and after each scoring or eval pass) compares the
  gradient of the adapter's first layer on a tiny batch with the same model's through the dequantized
  base, and stops the run with one line when they disagree (cosine < 0.99), naming versions and cause.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

log = logging.getLogger(__name__)

MIN_CPU_VERSION = (0, 46)  # the first bitsandbytes release with CPU kernels for 4-bit and 8-bit layers


def describe(q) -> str:
    """'nf4 (double quant)', 'int8', or '' for a full-precision base."""
    if not q.enabled:
        return ""
    if q.bits == 8:
        return "int8"
    return q.quant_type + (" (double quant)" if q.double_quant else "")


def base_tag(q) -> str:
    """Appended to a base's identity wherever outputs of the base are cached: a quantized base is another model."""
    if q is None or not q.enabled:
        return ""
    return f"|bnb{q.bits}:{q.quant_type}:{int(q.double_quant)}:{q.compute_dtype}"


def bnb_config(q, model_dtype: str):
    """The transformers BitsAndBytesConfig for a QuantizationSection."""
    import torch
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = model_dtype if q.compute_dtype == "auto" else q.compute_dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute))


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_backend(q, device) -> None:
    """Raise a ModelError that says what to install when bitsandbytes cannot run this quantization on `device`.

    Probing a tiny layer (milliseconds) is the only reliable test: bitsandbytes imports without a backend
    for a device and fails at the first matmul, deep inside the first training step."""
    import torch

    from .errors import ModelError

    try:
        bnb = import_bitsandbytes()
    except ImportError:
        raise ModelError(f"quantization.bits={q.bits} needs bitsandbytes, which is not installed: pip install "
                         "'bitsandbytes>=0.46' (or set quantization.bits=none)") from None
    device = torch.device(device)
    if device.type == "cpu" and _version(bnb.__version__) < MIN_CPU_VERSION:
        raise ModelError(f"quantization.bits={q.bits} on CPU needs bitsandbytes >= 0.46 (its CPU backend); "
                         f"found {bnb.__version__}: pip install -U bitsandbytes, or train on a GPU")
    try:
        _probe(bnb, q, device)
    except Exception as e:  # bitsandbytes reports a missing backend as RuntimeError, NotImplementedError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"quantization.bits={q.bits}: bitsandbytes {bnb.__version__} cannot run "
                         f"{describe(q)} layers on {device} ({first}); install a bitsandbytes build with a "
                         f"{device.type} backend, or set quantization.bits=none") from None


def _probe(bnb, q, device) -> None:
    """One forward + backward through a 16x16 quantized layer on `device`."""
    import torch

    w = torch.randn(16, 16)
    if q.bits == 8:
        layer = bnb.nn.Linear8bitLt(16, 16, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(16, 16, bias=False, compute_dtype=torch.float32, quant_type=q.quant_type,
                                  compress_statistics=q.double_quant)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=q.quant_type,
                                         compress_statistics=q.double_quant)
    layer = layer.to(device)
    with torch.enable_grad():  # callers may load a model inside no_grad (scoring, analysis)
        x = torch.randn(2, 16, device=device, requires_grad=True)
        layer(x).float().sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("the probe layer's backward gave no finite gradient")


def load_kwargs(q, model_dtype: str, device) -> dict:
    """Extra from_pretrained arguments for a quantized base on `device` (bitsandbytes places the weights itself)."""
    import torch

    device = torch.device(device)
    place = device.index if device.type == "cuda" and device.index is not None else str(device)
    return {"quantization_config": bnb_config(q, model_dtype), "device_map": {"": place}}


def dequantize(model, dtype: str):
    """The quantized model as a plain one: every bitsandbytes layer back to an nn.Linear holding dequant(W)."""
    import torch

    model.dequantize()  # transformers: bnb layers -> nn.Linear, drops the quantizer and quantization_config
    return model.to(getattr(torch, dtype))


def prepare_for_training(model):
    """PEFT's k-bit preparation: freeze the base and keep norms and embeddings in float32 for stable training.
    Gradient checkpointing stays the loop's business (train.gradient_checkpointing)."""
    from peft import prepare_model_for_kbit_training

    keep_training_layout(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# --- bitsandbytes only when asked for ---------------------------------------------------------------------

_hidden = False  # whether hide_bitsandbytes put the None in sys.modules (and not a test or the user)


def hide_bitsandbytes() -> None:
    """Make bitsandbytes look absent (import fails, importlib.util.find_spec says None) unless something has
    imported it already: for a full-precision base, so that peft does not import it (and bitsandbytes does not
    log its optional-kernel line, or spend seconds importing) when it is merely installed."""
    global _hidden
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None
        _hidden = True


def import_bitsandbytes():
    """bitsandbytes for a quantized base (ImportError when it is not installed). Its import-time log lines
    (an optional hub kernel that could not be loaded: a speed note for CPU inference, which sftlab's training
    layout does not use) go to the `sftlab.quantize` logger at debug level; warnings and errors at use time
    still reach the user."""
    global _hidden
    if _hidden and sys.modules.get("bitsandbytes", 0) is None:
        del sys.modules["bitsandbytes"]
        _hidden = False
    if "bitsandbytes" in sys.modules:  # imported already (by peft in the caller's process, say)
        import bitsandbytes
    else:
        with _bnb_logs_to_debug():
            import bitsandbytes
    # LLM.int8 rounds a scoring pass's activations to fp16 (the module docstring says so): logged for every layer
    # and call, it buried the run's own lines
    cast = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNote) for f in cast.filters):
        cast.addFilter(_CastNote())
    pu = sys.modules.get("peft.import_utils")  # peft may have looked while bitsandbytes was hidden
    if pu is not None and hasattr(pu.is_bnb_4bit_available, "cache_clear"):
        pu.is_bnb_4bit_available.cache_clear()
    helpers = sys.modules.get("peft.helpers")
    if helpers is not None and getattr(helpers, "bnb", None) is None and hasattr(bitsandbytes, "nn"):
        helpers.bnb = bitsandbytes
    return bitsandbytes


class _CastNote(logging.Filter):
    def filter(self, record):
        if record.getMessage().startswith("MatMul8bitLt: inputs will be cast"):
            log.debug("bitsandbytes: %s", record.getMessage())
            return False
        return True


class _ToDebug(logging.Handler):
    def emit(self, record):
        log.debug("bitsandbytes (import): %s", record.getMessage())


@contextlib.contextmanager
def _bnb_logs_to_debug():
    logger = logging.getLogger("bitsandbytes")
    handler, old = _ToDebug(), (logger.propagate, logger.level)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, _ = old
        logger.setLevel(old[1])


# --- the training layout ----------------------------------------------------------------------------------

def keep_training_layout(model) -> int:
    """Keep every 4-bit layer of `model` in the layout whose matmul has a backward (module docstring): turn off
    bitsandbytes' CPU inference repack and undo one already done. Returns how many layers were repacked."""
    undone = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
            undone += 1
    return undone


# --- the guard --------------------------------------------------------------------------------------------

MIN_COSINE = 0.99
GUARD_TOKENS = 16
_NO_AUTOGRAD = "an autograd kernel was not registered"


def quantized_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
            and not hasattr(m, "base_layer")]


def dequantized_weight(layer):
    """dequant(W) of a bitsandbytes Linear4bit or Linear8bitLt, without changing the layer."""
    import copy

    import bitsandbytes.functional as F

    w = layer.weight
    if type(w).__name__ == "Params4bit":
        data, qs = w.data, w.quant_state
        if getattr(qs, "packing_format_for_cpu", False):  # the inference layout: undo it on copies
            data, qs = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(qs))
        return F.dequantize_4bit(data, qs)
    state = layer.state
    cb = state.CB if state.CB is not None else w.data
    scb = state.SCB if state.SCB is not None else w.SCB
    return F.int8_vectorwise_dequant(cb, scb)


@contextlib.contextmanager
def dequantized_base(model):
    """Inside: every bitsandbytes layer of `model` computes x @ dequant(W).T in float (the twin the guard
    compares against); the quantized weights are untouched."""
    import types

    import torch

    def forward(self, x):
        dtype = getattr(self, "compute_dtype", None) or x.dtype
        w = dequantized_weight(self).to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), w, bias).to(x.dtype)

    layers = quantized_layers(model)
    own = [m.__dict__.get("forward") for m in layers]  # a hook's forward (accelerate), if any, comes back
    for m in layers:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m, f in zip(layers, own):
            del m.forward
            if f is not None:
                m.forward = f


def _first_adapter_params(model) -> tuple[str, list]:
    """The trainable parameters of the earliest adapted module: gradients reach it through every later layer."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return "", []
    first = named[0][0]
    for mark in (".lora_", ".oft_", ".boft_", ".ia3_"):
        if mark in first:
            owner = first.split(mark)[0]
            return owner, [p for n, p in named if n.startswith(owner + ".")]
    owner = first.rsplit(".", 1)[0]
    return owner, [p for n, p in named if n.rsplit(".", 1)[0] == owner]


def _adapter_grad(model, ids, params) -> tuple:
    import torch

    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []), torch.enable_grad(), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)  # the same dropout masks in both passes; the run's RNG stream is left as it was
        model(input_ids=ids, labels=ids).loss.float().backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                      for p in params])
    for p, g in zip(params, saved):
        p.grad = g
    return grad, [str(w.message) for w in caught]


def versions() -> str:
    import importlib.metadata as md

    out = []
    for name in ("bitsandbytes", "torch", "peft", "transformers"):
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def check_gradients(model, when: str, min_cosine: float = MIN_COSINE) -> float | None:
    """Raise SftlabError (one line) unless the adapter's first layer gets, on a tiny batch, the gradient it would
    get through the dequantized base (cosine >= min_cosine). Returns the cosine (None: nothing to check).
    Costs two forward/backward passes over GUARD_TOKENS tokens; the model's mode, gradients and RNG stay."""
    import torch

    from .errors import SftlabError

    inner = getattr(model, "module", model)  # DDP: the local module, no collectives
    layers = quantized_layers(inner)
    owner, params = _first_adapter_params(inner)
    if not layers or not params:
        return None
    device = params[0].device
    vocab = inner.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, GUARD_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    was = inner.training
    inner.train()
    try:
        got, caught = _adapter_grad(inner, ids, params)
        with dequantized_base(inner):
            want, _ = _adapter_grad(inner, ids, params)
    finally:
        inner.train(was)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item() if want.norm() > 0 else 1.0
    lost = [m for m in caught if _NO_AUTOGRAD in m]
    if cos >= min_cosine and not lost:
        return cos
    packed = sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
                 for m in layers)
    if packed:
        cause = (f"{packed} of {len(layers)} 4-bit layers are in bitsandbytes' CPU inference layout "
                 "(quant_state.packing_format_for_cpu), whose gemv_4bit matmul has no backward")
    elif lost:
        cause = "PyTorch: " + lost[0].split(". ")[0]
    else:
        cause = "the quantized matmul's backward does not match its forward"
    raise SftlabError(f"quantization: gradients do not reach the adapter through the quantized base {when} "
                      f"(cosine {cos:.3f} < {min_cosine} at {owner or 'the first trainable layer'}, against the "
                      f"same model with the base dequantized): {cause}; {versions()}. Training would silently "
                      "not learn; set quantization.bits=none, or use a bitsandbytes/peft pair that trains "
                      "(see sftlab.quantize)")


class GradientGuard:
    """A loop callback: check_gradients before training (after the step-0 scoring pass) and after every
    checkpoint (its scoring pass) and eval pass."""

    def __init__(self, model):
        self.model = model

    def on_train_start(self, step):
        check_gradients(self.model, "before training" if step == 0 else f"at step {step} (resumed)")

    def on_step_end(self, step, metrics):
        pass

    def on_eval(self, step, metrics):
        check_gradients(self.model, f"after the step-{step} eval pass")

    def on_checkpoint(self, step, entry):
        check_gradients(self.model, f"after the step-{step} checkpoint and its scoring pass")

    def on_train_end(self, step, summary):
        pass
