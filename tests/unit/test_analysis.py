"""Geometry metrics on cases with known answers (sftlab.analysis.weights / .activations)."""

from __future__ import annotations

import math

import pytest
import torch

from sftlab.analysis import activations as act
from sftlab.analysis import weights as wts


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q.float()  # (n, k) orthonormal columns


def base_weight(m=64, n=48, seed=0) -> torch.Tensor:
    """A weight with a well separated spectrum s_i = 1 + i / 10 (descending)."""
    r = min(m, n)
    s = torch.linspace(1 + (r - 1) / 10, 1.0, r)
    return orthonormal(m, r, seed) @ torch.diag(s) @ orthonormal(n, r, seed + 1).T


# ---- weights --------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 3, 7])
def test_planted_rank_r_update_has_effective_rank_r(r):
    w0 = base_weight()
    dw = 0.3 * orthonormal(64, r, 5) @ orthonormal(48, r, 6).T  # r equal singular values
    m = wts.module_metrics(w0, w0 + dw)
    assert m["effective_rank"] == pytest.approx(r, rel=1e-4)
    assert 1 <= m["energy90_rank"] <= r
    assert m["rel_update_spectral"] == pytest.approx(0.3 / torch.linalg.matrix_norm(w0, 2).item(), rel=1e-4)
    assert m["rel_update_frob"] == pytest.approx(0.3 * math.sqrt(r) / w0.norm().item(), rel=1e-4)


def test_energy_rank_counts_the_dominant_directions():
    s = torch.tensor([10.0, 1.0, 1.0, 1.0])  # 100 of 103 in the first: 97% -> k = 1
    assert wts.energy_rank(s) == 1
    assert wts.energy_rank(torch.ones(10)) == 9  # 90% of 10 equal values
    assert wts.effective_rank(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(2.0)


def test_off_spectrum_direction_is_an_intruder_and_an_in_spectrum_one_is_not():
    m_, n_ = 48, 48
    w0 = base_weight(m_, n_)
    b = wts.svd(w0)
    # A unit direction spread evenly over all of W0's left singular vectors: max |cos| = 1/sqrt(48) ~ 0.14.
    spread = b.U @ torch.full((n_,), 1 / math.sqrt(n_))
    v = b.Vh[-1]  # the weakest input direction: the planted output direction dominates there
    off = wts.module_metrics(w0, w0 + 20 * torch.outer(spread, v))
    assert off["intruders"] >= 1 and 0 in off["intruder_index"]
    assert off["intruder_max_cos"][0] < 0.5
    # An update along W0's own 6th singular pair only re-weights the spectrum: no intruder.
    inside = wts.module_metrics(w0, w0 + 20 * torch.outer(b.U[:, 5], b.Vh[5]))
    assert inside["intruders"] == 0
    assert inside["intruder_max_cos"][0] == pytest.approx(1.0, abs=1e-4)


def test_retention_and_adaptation_views_on_a_planted_pair():
    w0 = base_weight()
    b = wts.svd(w0)
    i = 4
    m = wts.module_metrics(w0, w0 + 0.5 * torch.outer(b.U[:, i], b.Vh[i]), max_points=1000)
    dp, e = torch.tensor(m["dp"]), torch.tensor(m["e"])
    assert dp[i] == pytest.approx(0.5, abs=1e-4) and e[i] == pytest.approx(0.5, abs=1e-4)
    others = torch.cat([dp[:i], dp[i + 1:]])
    assert others.abs().max() < 1e-4 and torch.cat([e[:i], e[i + 1:]]).abs().max() < 1e-4
    assert m["s0"] == pytest.approx(b.S.tolist(), abs=1e-5)


def test_unchanged_weight_is_reported_as_unchanged():
    w0 = base_weight()
    assert wts.module_metrics(w0, w0.clone()) == {"changed": False, "shape": [64, 48]}


def test_wide_matrices_decompose_like_tall_ones():
    w = base_weight(32, 80, seed=3)
    s = wts.svd(w)
    assert s.U.shape == (32, 32) and s.Vh.shape == (32, 80)
    assert torch.allclose(s.U @ torch.diag(s.S) @ s.Vh, w, atol=1e-5)
    assert torch.allclose(wts.svdvals(w), torch.linalg.svdvals(w), atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_gram_shortcuts_match_the_svd(shape):
    w = base_weight(*shape, seed=4)
    ref = wts.svd(w)
    top = wts.top_left_vectors(w, 10)  # (m, 10)
    assert top.shape == (shape[0], 10)
    assert (ref.U[:, :10] * top).sum(0).abs() == pytest.approx([1.0] * 10, abs=1e-4)  # same vectors up to sign
    assert wts.gram_singular_values(w).tolist() == pytest.approx(ref.S.tolist(), abs=1e-5)


def test_smoothness_is_zero_for_a_line_and_large_for_spikes():
    assert wts.smoothness(torch.arange(20.0)) == pytest.approx(0.0, abs=1e-12)
    spiky = torch.zeros(20)
    spiky[::2] = 1.0
    assert wts.smoothness(spiky) > 0.3
    assert wts.moving_average(torch.tensor([1.0, 2.0, 3.0]), 5).tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_rotation_keeps_the_spectrum_and_turns_the_right_vectors():
    w0 = base_weight(48, 48)
    angle = 0.3  # rotate the input plane (e0, e1): an OFT-like block rotation
    r = torch.eye(48)
    r[0, 0] = r[1, 1] = math.cos(angle)
    r[0, 1], r[1, 0] = -math.sin(angle), math.sin(angle)
    m = wts.module_metrics(w0, w0 @ r, rotation=True, max_points=1000)
    assert wts.svdvals(w0 @ r) == pytest.approx(wts.svdvals(w0).tolist(), abs=1e-5)
    assert 0 < m["alignment_mean"] < 1
    assert min(m["alignment"]) < 0.999  # some right singular vector turned
    plain = wts.module_metrics(w0, w0 * 1.01, rotation=True)
    assert plain["alignment_mean"] == pytest.approx(1.0, abs=1e-4)  # scaling turns nothing


def test_svd_cache_computes_once():
    cache = wts.SVDCache()
    w0 = base_weight()
    a = cache.get("m", w0)
    assert cache.get("m", w0) is a and len(cache) == 1


def test_aggregate_means_per_layer_and_sums_intruders():
    mods = {"model.layers.0.q": {"changed": True, "effective_rank": 2.0, "intruders": 1},
            "model.layers.0.k": {"changed": True, "effective_rank": 4.0, "intruders": 2},
            "model.layers.1.q": {"changed": False}}
    from sftlab.analysis.run import layer_of

    agg = wts.aggregate(mods, layer_of)
    assert agg["effective_rank"] == 3.0 and agg["intruders"] == 3.0 and agg["modules"] == 2
    assert agg["modules_total"] == 3 and list(agg["per_layer"]) == ["0"]


# ---- activations ----------------------------------------------------------------------------------

def acts(t=300, d=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g) @ torch.randn(d, d, generator=g) + 0.5  # (T, d) correlated, offset


def test_orthogonal_transform_keeps_cka_and_has_zero_procrustes_residual():
    x0 = acts()
    q = orthonormal(40, 40, 9)
    x1 = x0 @ q
    res = act.compare(x0, x1)
    assert res["procrustes_residual"] == pytest.approx(0.0, abs=1e-6)
    assert res["raw_distance"] > 0.5 and res["procrustes_gain"] == pytest.approx(res["raw_distance"], abs=1e-6)
    # CKA centres columns; a rotation of the centred data is a rotation, so CKA stays 1.
    assert act.linear_cka(x0 - x0.mean(0), (x0 - x0.mean(0)) @ q) == pytest.approx(1.0, abs=1e-9)
    assert act.linear_cka(x0, x0 @ q) == pytest.approx(1.0, abs=1e-9)
    assert res["norm_log_ratio"] == pytest.approx(0.0, abs=1e-6)  # rotations keep token norms
    assert res["gram_distortion"] == pytest.approx(0.0, abs=1e-6)  # and token-to-token cosines


def test_identical_activations_have_zero_distortion_and_distance():
    x0 = acts()
    res = act.compare(x0, x0.clone())
    assert res["gram_distortion"] == pytest.approx(0.0, abs=1e-7)
    assert res["subspace_k32"] == pytest.approx(0.0, abs=1e-6)
    assert res["subspace_k64"] is None  # k >= d: undefined, reported as null
    assert res["cosine_drift"] == pytest.approx(0.0, abs=1e-12) and res["cka"] == pytest.approx(1.0)


def test_metrics_see_a_real_change():
    x0 = acts(d=80)
    g = torch.Generator().manual_seed(3)
    x1 = x0 + 2.0 * torch.randn(x0.shape, generator=g) * x0.std()
    res = act.compare(x0, x1)
    assert res["cosine_drift"] > 0.1 and res["cka"] < 0.9 and res["gram_distortion"] > 0.1
    assert res["procrustes_residual"] > 0.1 and 0 < res["subspace_k32"] <= 1
    assert act.norm_log_ratio(x0, 2 * x0) == pytest.approx(math.log(2))


def test_subspace_distance_of_orthogonal_subspaces_is_one():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(200, 8)
    x1 = torch.zeros(200, 8)
    x0[:, :2] = torch.randn(200, 2, generator=g) * torch.tensor([3.0, 2.0])
    x1[:, 4:6] = torch.randn(200, 2, generator=g) * torch.tensor([3.0, 2.0])
    assert act.subspace_distance(x0, x1, 2) == pytest.approx(1.0, abs=1e-6)


def test_update_response_is_the_energy_ratio():
    lin = torch.nn.Linear(16, 8, bias=False)
    dw = torch.zeros(8, 16)
    dw[0, 0] = 1.0
    resp = act.UpdateResponse({"lin": lin.weight.detach() + dw})
    h = torch.randn(50, 16)
    resp("lin", lin, h)
    want = float((h @ dw.T).pow(2).sum() / (h @ lin.weight.detach().T).pow(2).sum())
    assert resp.ratios()["lin"] == pytest.approx(want, rel=1e-5)
    again = act.UpdateResponse({"lin": lin.weight.detach() + dw})
    with torch.no_grad():
        again("lin", lin, h, lin(h))  # the forward pass's own output stands in for W0 h
    assert again.ratios()["lin"] == pytest.approx(want, rel=1e-5)


def test_capture_drops_padding(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    texts = ["a short one", "a much longer text with many more tokens in it than the first"]
    layers = act.decoder_layers(model)
    points = {"1.block": layers[1]}
    both = act.capture(model, tokenizer, texts, points, batch_size=2)["1.block"]
    alone = torch.cat([act.capture(model, tokenizer, [t], points, batch_size=1)["1.block"] for t in texts])
    n = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert both.shape == (n, 64) and torch.allclose(both, alone, atol=1e-5)
