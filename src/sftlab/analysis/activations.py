"""Activation space: how far a fine-tuned model's representations moved from the base model's.

Metric functions are pure, on token-level activation matrices X0 (base) and X1 (fine-tuned) of shape
(T, d): the same T real tokens (padding removed) through the same module of each model. All of them run
in float64 (several are differences of nearly equal sums).

- cosine drift: mean over tokens of 1 - cos(x0_t, x1_t);
- norm change: mean |log(||x1_t|| / ||x0_t||)|;
- linear CKA (Kornblith et al. 2019) on column-centred X: ||X1^T X0||_F^2 / (||X0^T X0||_F ||X1^T X1||_F);
  1 for identical representations and under any orthogonal transform or isotropic scaling;
- orthogonal Procrustes (Schonemann 1966): min_R orthogonal ||X0 R - X1||_F / ||X0||_F
  = sqrt(||X0||^2 + ||X1||^2 - 2 ||X0^T X1||_*) / ||X0||_F, beside the raw ||X1 - X0||_F / ||X0||_F; their
  difference is the part of the move a rotation explains; `procrustes_centred` is the residual after centring
  both (subtracting column means), PEFT-Arena's definition, which its forgetting correlation uses;
- Gram distortion ||K1 - K0||_F / ||K0||_F, K = Xn Xn^T with row-normalised tokens (token-to-token cosine
  structure), computed through d x d products, never the T x T matrices;
- PCA subspace distance for k in (32, 64): P0, P1 the top-k principal directions (d, k) of the centred X;
  sqrt((k - ||P0^T P1||_F^2) / k), the normalised chordal distance, 0 for the same subspace, 1 for
  orthogonal ones (null when k >= d or k >= T);
- relative update response E||dW h||^2 / E||W0 h||^2 per linear module, with h the *base* model's inputs to
  that module: how much the update changes what the module writes, on the inputs it used to see.

`capture` runs a model on texts and returns module outputs with padding removed; prompt tuning's virtual
tokens (prepended positions) are dropped, so base and tuned outputs align token by token.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)$")
POINTS = {"block": "", "attn": ".self_attn", "mlp": ".mlp"}  # where activations are read in a decoder layer


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().reshape(-1, x.shape[-1])


def cosine_drift(x0: torch.Tensor, x1: torch.Tensor) -> float:
    x0, x1 = _f64(x0), _f64(x1)
    return float((1 - torch.nn.functional.cosine_similarity(x0, x1, dim=-1)).mean())


def norm_log_ratio(x0: torch.Tensor, x1: torch.Tensor) -> float:
    n0, n1 = _f64(x0).norm(dim=-1), _f64(x1).norm(dim=-1)
    tiny = torch.finfo(torch.float64).tiny
    return float((n1.clamp_min(tiny).log() - n0.clamp_min(tiny).log()).abs().mean())


def linear_cka(x0: torch.Tensor, x1: torch.Tensor) -> float:
    x0, x1 = _f64(x0), _f64(x1)
    x0, x1 = x0 - x0.mean(0), x1 - x1.mean(0)
    cross = (x1.T @ x0).norm() ** 2
    denom = (x0.T @ x0).norm() * (x1.T @ x1).norm()
    return float(cross / denom) if denom > 0 else float("nan")


def procrustes(x0: torch.Tensor, x1: torch.Tensor) -> tuple[float, float]:
    """(residual, raw): min over orthogonal R of ||X0 R - X1||_F, and ||X1 - X0||_F, both / ||X0||_F."""
    x0, x1 = _f64(x0), _f64(x1)
    n0 = x0.norm()
    nuclear = torch.linalg.svdvals(x0.T @ x1).sum()  # (d, d) cross-covariance; R = U V^T attains it
    res2 = (n0 ** 2 + x1.norm() ** 2 - 2 * nuclear).clamp_min(0)
    return float(res2.sqrt() / n0), float((x1 - x0).norm() / n0)


def gram_distortion(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """||K1 - K0||_F / ||K0||_F with K = Xn Xn^T; ||A A^T - B B^T||_F^2 = ||A^T A||^2 + ||B^T B||^2 - 2||A^T B||^2."""
    a = torch.nn.functional.normalize(_f64(x0), dim=-1)
    b = torch.nn.functional.normalize(_f64(x1), dim=-1)
    k0 = (a.T @ a).norm() ** 2  # = ||K0||_F^2
    diff2 = (k0 + (b.T @ b).norm() ** 2 - 2 * (a.T @ b).norm() ** 2).clamp_min(0)
    return float(diff2.sqrt() / k0.sqrt())


def principal_directions(x: torch.Tensor) -> torch.Tensor:
    """(d, d) eigenvectors of the covariance of the centred rows of x, the largest variance last."""
    x = _f64(x)
    x = x - x.mean(0)
    return torch.linalg.eigh(x.T @ x).eigenvectors  # ascending eigenvalues


def subspace_distance(x0: torch.Tensor, x1: torch.Tensor, k: int, pcs=None) -> float | None:
    """`pcs`: (principal_directions(x0), principal_directions(x1)) if already computed."""
    t, d = x0.shape
    if k >= d or k >= t:
        return None
    v0, v1 = pcs if pcs is not None else (principal_directions(x0), principal_directions(x1))
    p0, p1 = v0[:, -k:], v1[:, -k:]  # (d, k) top-k directions
    overlap = (p0.T @ p1).norm() ** 2  # in [0, k]
    return float(((k - overlap).clamp_min(0) / k).sqrt())


def compare(x0: torch.Tensor, x1: torch.Tensor, ks: tuple[int, ...] = (32, 64)) -> dict:
    """Every activation metric for one module: x0, x1 (T, d) base and fine-tuned outputs on the same tokens."""
    if x0.shape != x1.shape:
        raise ValueError(f"activations differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
    residual, raw = procrustes(x0, x1)
    centred, _ = procrustes(x0 - x0.mean(0), x1 - x1.mean(0))  # PEFT-Arena's definition (REFERENCES.md)
    out = {"tokens": int(x0.shape[0]), "cosine_drift": cosine_drift(x0, x1), "norm_log_ratio": norm_log_ratio(x0, x1),
           "cka": linear_cka(x0, x1), "procrustes_residual": residual, "raw_distance": raw,
           "procrustes_gain": raw - residual, "procrustes_centred": centred, "gram_distortion": gram_distortion(x0, x1)}
    pcs = (principal_directions(x0), principal_directions(x1))  # one eigendecomposition serves every k
    for k in ks:
        out[f"subspace_k{k}"] = subspace_distance(x0, x1, k, pcs)
    return out


ACT_KEYS = ("cosine_drift", "norm_log_ratio", "cka", "procrustes_residual", "raw_distance", "procrustes_gain",
            "procrustes_centred", "gram_distortion", "subspace_k32", "subspace_k64")


# ---- capture ------------------------------------------------------------------------------------------

def decoder_layers(model) -> dict[int, str]:
    """{layer index: module name} of the decoder layers (names ending in `layers.N`), PEFT-wrapped or not."""
    out = {}
    for name, _ in model.named_modules():
        m = LAYER_RE.search(name)
        if m:
            out[int(m.group(1))] = name
    return dict(sorted(out.items()))


def batches(tokenizer, texts: list[str], max_length: int, batch_size: int):
    """Yield (input_ids (B, L), attention_mask (B, L)) right-padded batches of the texts' first tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    ids = [x for x in ids if x]
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        L = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), L), int(pad), dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, x in enumerate(chunk):
            input_ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        yield input_ids, mask


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def hooks(modules: dict, fn):
    """Register `fn(key, module, inputs, output)` as a forward hook on every module; remove them afterwards."""
    handles = [m.register_forward_hook(lambda mod, inp, out, key=key: fn(key, mod, inp, out))
               for key, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture(model, tokenizer, texts: list[str], points: dict[str, str], max_length: int = 128,
            batch_size: int = 8, on_input=None, input_names=()) -> dict[str, torch.Tensor]:
    """{key: (T, d) float32 outputs with padding removed} for `points` {key: module name} over the texts.

    `on_input(name, module, h (N, d_in), y (N, d_out))`, if given, also sees the real-token inputs and outputs
    of the modules named in `input_names` (the update response reads the base model's linears this way).
    The output layer runs on the last position only (`logits_to_keep=1`): its vocab-sized matmul would
    otherwise cost more than all the layers whose outputs are read."""
    named = dict(model.named_modules())
    store: dict[str, list[torch.Tensor]] = {k: [] for k in points}
    mask_now: list[torch.Tensor] = []

    def real(x: torch.Tensor) -> torch.Tensor:  # (B, L', d) -> (N, d): virtual tokens then padding removed
        m = mask_now[0]
        x = x[:, x.shape[1] - m.shape[1]:] if x.shape[1] != m.shape[1] else x
        return x[m.bool()]

    def keep(key, mod, inp, out):
        store[key].append(real(_first(out)).detach().float())

    inputs = {n: named[n] for n in input_names} if on_input is not None else {}

    def see_input(name, mod, inp, out):
        on_input(name, mod, real(inp[0]).detach(), real(_first(out)).detach())

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), hooks({k: named[n] for k, n in points.items()}, keep), hooks(inputs, see_input):
            for input_ids, mask in batches(tokenizer, texts, max_length, batch_size):
                mask_now[:] = [mask]
                model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    finally:
        model.train(was)
    return {k: torch.cat(v) for k, v in store.items() if v}


class UpdateResponse:
    """Accumulates sum ||dW h||^2 and sum ||W0 h||^2 per linear module over base inputs h; `ratios()`.

    `tuned` maps a base module name to its fine-tuned weight Wft; dW = Wft - W0 is formed per batch (a
    transient (out, in) tensor) rather than held for every module at once."""

    def __init__(self, tuned: dict[str, torch.Tensor]) -> None:
        self.tuned = tuned
        self.num: dict[str, float] = {}
        self.den: dict[str, float] = {}

    def __call__(self, name, module, h, y=None):
        """h: (N, d_in) the base model's inputs to this module; y: (N, d_out) its outputs W0 h + b, if known."""
        w0 = module.weight.detach().float()
        dw = self.tuned[name].detach().float() - w0  # (out, in)
        h = h.detach().float()
        if y is None:
            w0h = h @ w0.T
        else:  # the forward pass already computed W0 h: reuse it
            w0h = y.detach().float() - (module.bias.detach().float() if module.bias is not None else 0.0)
        dwh = h @ dw.T  # (N, d_out)
        self.num[name] = self.num.get(name, 0.0) + float((dwh * dwh).sum(dtype=torch.float64))
        self.den[name] = self.den.get(name, 0.0) + float((w0h * w0h).sum(dtype=torch.float64))

    def ratios(self) -> dict[str, float]:
        return {k: self.num[k] / self.den[k] for k in self.num if self.den.get(k)}
