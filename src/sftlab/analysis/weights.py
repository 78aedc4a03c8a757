"""Weight space: the singular-value structure of an update, per linear module (pure functions on tensors).

For a base weight W0 = U S V^T (thin SVD, float32, torch.linalg) and the fine-tuned weight Wft with the
method's update merged in, dW = Wft - W0:

- retention view (PEFT-Arena 2026): dP(i) = |u_i^T Wft v_i - s_i|, how far the base's own spectrum moved;
- adaptation view: E(i) = ||dW v_i||_2, how much the update acts along each base input direction;
- effective (stable) rank ||dW||_F^2 / ||dW||_2^2 and the smallest k holding 90% of sum sigma_j(dW)^2;
- relative update size ||dW||_2 / ||W0||_2 and ||dW||_F / ||W0||_F;
- intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
  among the top-k left singular vectors of Wft, those whose largest |cos| with any left singular vector
  of W0 is below eps (k=10, eps=0.5). Left vectors: they live in the output space the next layer reads;
  `side="right"` compares input-space vectors instead;
- smoothness of the dP curve: mean |x - MA5(x)|, MA5 a centred 5-point moving average, over the points
  where the whole window fits, so a spiky retention view scores high and a smooth one near 0;
- for rotation methods (OFT, BOFT), alignment |cos(v_i(W0), v_i(Wft))| per index: a pure input rotation
  keeps the singular values and turns the right singular vectors.

W0's thin SVD is exact (float32 torch.linalg.svd, of the tall orientation: a wide matrix is decomposed
transposed, 1.5x faster for SmolLM2's 576x1536 down projections) and does not depend on the checkpoint:
`SVDCache` computes it once per base and module and keeps it for every step. Per step, Wft's top-k vectors
and dW's singular values come from the eigendecomposition of the smaller Gram matrix (3x and 1.3x faster
than SVDs, and exact for what is used: the top of the spectrum and sums of squares); rotation methods
get Wft's full SVD, as alignment compares every right singular vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SVD:
    """Thin SVD W = U diag(S) Vh, float32. U: (m, r), S: (r,), Vh: (r, n), r = min(m, n)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def svd(w: torch.Tensor) -> SVD:
    """Thin SVD in float32, computed on the tall orientation of `w` (m, n)."""
    w = w.detach().float()
    if w.shape[0] < w.shape[1]:
        U, S, Vh = torch.linalg.svd(w.T, full_matrices=False)  # w^T = U S Vh  =>  w = Vh^T S U^T
        return SVD(Vh.T.contiguous(), S, U.T.contiguous())
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return SVD(U, S, Vh)


def svdvals(w: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float32) of `w`, tall orientation."""
    w = w.detach().float()
    return torch.linalg.svdvals(w.T if w.shape[0] < w.shape[1] else w)


def gram_singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) from the eigenvalues of the smaller Gram matrix, in float64.

    Exact where it matters here (the largest values and the sums of squares behind the effective and
    energy ranks); values below ~1e-8 of the largest come out as noise or 0. 1.3-2x faster than svdvals."""
    w = w.detach().double()
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # (r, r), r = min(m, n)
    return torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt()


def top_left_vectors(w: torch.Tensor, k: int) -> torch.Tensor:
    """(m, k) the top-k left singular vectors of `w` (m, n), from the smaller Gram matrix's eigenvectors.

    3x faster than a full SVD of SmolLM2's 1536x576 weights. Squaring the matrix costs accuracy only for
    singular values far below the largest, not for the top k (the vectors intruders are about)."""
    w = w.detach().float()
    m, n = w.shape
    k = min(k, m, n)
    if m <= n:
        return torch.linalg.eigh(w @ w.T).eigenvectors[:, -k:].flip(1)  # eigh sorts ascending
    vals, vecs = torch.linalg.eigh(w.T @ w)
    v = vecs[:, -k:].flip(1)  # (n, k) top right singular vectors
    u = w @ v  # (m, k) = U_k diag(s_k)
    return u / u.norm(dim=0).clamp_min(torch.finfo(u.dtype).tiny)


class SVDCache:
    """W0's SVD per module name, computed on first use. One instance per base model (the key is the name)."""

    def __init__(self) -> None:
        self._svd: dict[str, SVD] = {}

    def get(self, name: str, w0: torch.Tensor) -> SVD:
        if name not in self._svd:
            self._svd[name] = svd(w0)
        return self._svd[name]

    def __len__(self) -> int:
        return len(self._svd)


# ---- scalar summaries of a spectrum --------------------------------------------------------------------

def effective_rank(s: torch.Tensor) -> float:
    """Stable rank sum s_j^2 / s_1^2 of singular values `s` (descending); a rank-r update with equal
    singular values has exactly r, and any rank-r update has at most r."""
    s = s.double()
    return float((s ** 2).sum() / s[0] ** 2) if s.numel() and s[0] > 0 else 0.0


def energy_rank(s: torch.Tensor, frac: float = 0.9) -> int:
    """Smallest k with sum_{j<=k} s_j^2 >= frac * sum_j s_j^2."""
    e = s.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 0
    cum = e.cumsum(0) / total
    return int((cum < frac - 1e-12).sum()) + 1


def moving_average(x: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Centred moving average; near the ends the window is truncated to the available points."""
    x = x.double()
    half = window // 2
    c = torch.cat([torch.zeros(1, dtype=x.dtype), x.cumsum(0)])  # c[j] = sum x[:j]
    idx = torch.arange(x.numel())
    lo, hi = (idx - half).clamp(min=0), (idx + half + 1).clamp(max=x.numel())
    return (c[hi] - c[lo]) / (hi - lo)


def smoothness(x: torch.Tensor, window: int = 5) -> float:
    """mean |x - MA_window(x)| over the points whose whole window fits (all points if none does): 0 for a
    straight line (a truncated end window would bend it), large for a spiky curve."""
    if not x.numel():
        return 0.0
    dev = (x.double() - moving_average(x, window)).abs()
    half = window // 2
    return float(dev[half:x.numel() - half].mean() if x.numel() >= window else dev.mean())


def intruders(u0: torch.Tensor, u_ft: torch.Tensor, k: int = 10, eps: float = 0.5) -> tuple[list[int], list[float]]:
    """(indices among Wft's top-k singular vectors that are intruders, max |cos| of each of the top k).

    u0: (d, r0) W0's singular vectors (columns, unit norm); u_ft: (d, r) Wft's, in descending order."""
    top = u_ft[:, :k].double()  # (d, k)
    best = (u0.double().T @ top).abs().amax(0)  # (k,) largest |cos| with any base singular vector
    return [i for i, c in enumerate(best.tolist()) if c < eps], best.tolist()


def downsample(x: torch.Tensor, max_points: int) -> tuple[list[int], list[float]]:
    """(indices, values) of at most `max_points` evenly spaced entries of a spectrum (first and last kept)."""
    n = x.numel()
    if n <= max_points:
        idx = list(range(n))
    else:
        idx = sorted(set(torch.linspace(0, n - 1, max_points).round().long().tolist()))
    vals = x.double()[idx].tolist()
    return idx, [float(v) for v in vals]


# ---- one module -----------------------------------------------------------------------------------------

def module_metrics(w0: torch.Tensor, wft: torch.Tensor, base: SVD | None = None, k: int = 10, eps: float = 0.5,
                   rotation: bool = False, side: str = "left", max_points: int = 64) -> dict:
    """Every weight-space number for one linear module. w0, wft: (out, in). `base`: W0's SVD if cached.

    Returns {"changed": False} when Wft == W0 exactly; spectra (dP, E, s0, alignment) are downsampled to
    `max_points` for the JSON, while every scalar uses the full spectrum."""
    w0, wft = w0.detach().float(), wft.detach().float()
    if w0.shape != wft.shape:
        raise ValueError(f"W0 {tuple(w0.shape)} and Wft {tuple(wft.shape)} differ in shape")
    dw = wft - w0  # (out, in)
    if not torch.any(dw):
        return {"changed": False, "shape": list(w0.shape)}
    b = base if base is not None else svd(w0)
    s_dw = gram_singular_values(dw)  # (r,)
    dp = ((b.U.T @ wft) * b.Vh).sum(1).sub(b.S).abs()  # (r,) |u_i^T Wft v_i - s_i|
    e = (dw @ b.Vh.T).norm(dim=0)  # (r,) ||dW v_i||
    ft = svd(wft) if rotation else None  # alignment needs every right singular vector of Wft
    if side == "left":
        idx, cos = intruders(b.U, ft.U if ft else top_left_vectors(wft, k), k, eps)
    else:
        idx, cos = intruders(b.Vh.T, ft.Vh.T if ft else top_left_vectors(wft.T, k), k, eps)
    out = {
        "changed": True, "shape": list(w0.shape),
        "rel_update_spectral": float(s_dw[0] / b.S[0]),
        "rel_update_frob": float(dw.norm() / w0.norm()),
        "effective_rank": effective_rank(s_dw), "energy90_rank": energy_rank(s_dw, 0.9),
        "intruders": len(idx), "intruder_index": idx, "intruder_max_cos": cos,
        "dp_mean": float(dp.mean()), "dp_max": float(dp.max()), "dp_smoothness": smoothness(dp),
        "e_mean": float(e.mean()), "e_max": float(e.max()),
    }
    index, out["dp"] = downsample(dp, max_points)
    out["spectrum_index"] = index
    out["e"] = downsample(e, max_points)[1]
    out["s0"] = downsample(b.S, max_points)[1]
    if rotation:
        align = (b.Vh * ft.Vh).sum(1).abs()  # (r,) |cos(v_i(W0), v_i(Wft))|
        out["alignment_mean"] = float(align.mean())
        out["alignment"] = downsample(align, max_points)[1]
    return out


WEIGHT_KEYS = ("rel_update_spectral", "rel_update_frob", "effective_rank", "energy90_rank", "intruders", "dp_mean",
               "dp_smoothness", "e_mean", "alignment_mean")


def aggregate(modules: dict[str, dict], layer_of) -> dict:
    """Means of the scalar metrics (intruders: the sum) over changed modules, overall and per layer.

    `layer_of(name)` gives a module's layer index or None (modules outside the decoder layers)."""
    def summarise(items: list[dict]) -> dict:
        out: dict = {"modules": len(items)}
        for key in WEIGHT_KEYS:
            vals = [m[key] for m in items if key in m]
            if vals:
                out[key] = float(sum(vals)) if key == "intruders" else float(sum(vals) / len(vals))
        return out

    changed = {n: m for n, m in modules.items() if m.get("changed")}
    per_layer: dict[str, list[dict]] = {}
    for name, m in changed.items():
        layer = layer_of(name)
        if layer is not None:
            per_layer.setdefault(str(layer), []).append(m)
    res = summarise(list(changed.values()))
    res["modules_total"] = len(modules)
    res["per_layer"] = {k: summarise(v) for k, v in sorted(per_layer.items(), key=lambda kv: int(kv[0]))}
    return res
