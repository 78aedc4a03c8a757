"""Rewinding between the base and a checkpoint: endpoints, rotations staying rotations, refusals, export, search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_tiny_model, memorisable_chats, tiny_config, write_jsonl
from sftlab.errors import SftlabError
from sftlab.trajectory import Point

# name -> (method section, lr): a few steps at a high rate so every method visibly moves the logits
METHODS = {
    "lora": ({"name": "lora", "r": 4}, 1e-2),
    "dora": ({"name": "lora", "r": 4, "use_dora": True}, 1e-2),
    "full": ({"name": "full"}, 1e-3),
    "ia3": ({"name": "ia3"}, 1e-1),
    "oft": ({"name": "oft", "block_size": 8}, 1e-2),
    "boft": ({"name": "boft", "block_size": 4}, 1e-2),  # hidden 64: 16 blocks of 4
}
ROTATIONS = ["oft", "boft"]
IDS = [[1, 450, 1200, 33, 7, 900, 2, 61]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("interp-model"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("interp-data") / "d.jsonl", memorisable_chats(8))


_RUNS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, data_file):
    """name -> run directory of a 4-step run, trained once per module."""
    from sftlab.train.loop import Trainer

    def get(name: str) -> Path:
        if name not in _RUNS:
            method, lr = METHODS[name]
            cfg = tiny_config(tmp_path_factory.mktemp(f"interp-{name}"), model_dir, data_file, method,
                              train={"steps": 4, "lr": lr, "threads": 1})
            _RUNS[name] = Trainer(cfg).run()
        return _RUNS[name]

    return get


def logits(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def base_logits(run):
    from sftlab.models import load_model

    return logits(load_model(run.base_ref()))


@pytest.mark.parametrize("name", list(METHODS))
def test_endpoints_reproduce_base_and_checkpoint(name, trained):
    import torch
    from sftlab.interpolate import Interpolator
    from sftlab.runs import Run

    run = Run(trained(name))
    want0, want1 = base_logits(run), logits(run.load()[0])
    assert (want1 - want0).abs().max() > 1e-2, "training should have moved the logits"
    interp = Interpolator(run)
    for a, want in [(1.0, want1), (0.0, want0), (0.5, None), (1.0, want1), (0.0, want0)]:  # there and back
        got = logits(interp.at(a))
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"{name} at alpha {a}")
        else:
            assert 1e-3 < (got - want0).abs().max() and 1e-3 < (got - want1).abs().max()


@pytest.mark.parametrize("name", ["lora", "full", "ia3"])
def test_additive_midpoint_is_the_weight_midpoint(name, trained):
    import torch
    from sftlab.interpolate import Interpolator
    from sftlab.models import load_model
    from sftlab.runs import Run

    run = Run(trained(name))
    w0 = dict(load_model(run.base_ref()).named_parameters())
    w1 = dict(run.load(merge=True)[0].named_parameters())
    mid = dict(Interpolator(run).at(0.5).named_parameters())
    changed = [n for n in w0 if not torch.equal(w0[n], w1[n])]
    assert changed
    for n in changed:
        torch.testing.assert_close(mid[n], (w0[n] + w1[n]) / 2, atol=1e-6, rtol=0)


def _oft_blocks(model):
    from peft.tuners.oft.layer import OFTRotationModule

    return [m for m in model.modules() if isinstance(m, OFTRotationModule)]


def test_oft_interpolation_stays_orthogonal(trained):
    import torch
    from sftlab.interpolate import Interpolator
    from sftlab.runs import Run

    interp = Interpolator(Run(trained("oft")))
    trained_S = [m.weight.detach().clone() for m in _oft_blocks(interp.model)]
    assert max(s.abs().max().item() for s in trained_S) > 1e-3
    for a in (0.25, 0.5, 0.75):
        model = interp.at(a)
        for m, S in zip(_oft_blocks(model), trained_S):
            torch.testing.assert_close(m.weight, a * S, atol=0, rtol=0)  # the generator scaled by a
            with torch.no_grad():
                R = m.get_weight().double()
            eye = torch.eye(R.shape[0], dtype=R.dtype)
            assert (R.T @ R - eye).abs().max().item() <= 1e-5, f"R(a)^T R(a) != I at alpha {a}"
            assert (R - eye).abs().max().item() > 1e-5, "R(a) should rotate something"


def test_boft_interpolation_stays_orthogonal(trained):
    import torch
    from peft.tuners.boft.layer import BOFTLayer
    from sftlab.interpolate import Interpolator
    from sftlab.runs import Run

    interp = Interpolator(Run(trained("boft")))
    layers = [m for m in interp.model.modules() if isinstance(m, BOFTLayer)]
    s1 = [m.boft_s["default"].detach().clone() for m in layers]
    for a in (0.25, 0.5, 0.75):
        interp.at(a)
        for m, s in zip(layers, s1):
            with torch.no_grad():
                R, scale = m.get_delta_weight("default")
            R = R.double()
            eye = torch.eye(R.shape[0], dtype=R.dtype)
            assert (R.T @ R - eye).abs().max().item() <= 1e-5, f"BOFT R(a)^T R(a) != I at alpha {a}"
            torch.testing.assert_close(scale, 1 + a * (s - 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ROTATIONS + ["lora"])
def test_model_at_merges_into_a_plain_model_with_the_same_logits(name, trained):
    import torch
    from sftlab.interpolate import Interpolator, model_at
    from sftlab.runs import Run

    run = Run(trained(name))
    want = logits(Interpolator(run).at(0.5))
    model, tok = model_at(run, None, 0.5)
    assert not hasattr(model, "peft_config") and tok.chat_template
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


def test_export_at_writes_a_merged_model_folder(trained, tmp_path):
    import torch
    from sftlab.interpolate import export_at, model_at
    from sftlab.runs import Run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Run(trained("lora"))
    out = export_at(run, None, 0.5, tmp_path / "merged")
    meta = json.loads((out / "sftlab_export.json").read_text())
    assert meta["alpha"] == 0.5 and meta["merged"] is True and meta["step"] == 4
    assert AutoTokenizer.from_pretrained(str(out)).chat_template
    got = logits(AutoModelForCausalLM.from_pretrained(str(out)))
    torch.testing.assert_close(got, logits(model_at(run, None, 0.5)[0]), atol=1e-5, rtol=0)
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(SftlabError, match="exists and is not empty"):
        export_at(run, None, 0.5, out)
    with pytest.raises(SftlabError, match="merged only"):
        export_at(run, None, 0.5, tmp_path / "adapter", merge=False)


def test_export_at_writes_a_scaled_oft_adapter(trained, tmp_path):
    import torch
    from peft import PeftModel
    from sftlab.interpolate import Interpolator, export_at
    from sftlab.runs import Run
    from transformers import AutoModelForCausalLM

    run = Run(trained("oft"))
    out = export_at(run, None, 0.25, tmp_path / "adapter", merge=False)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == run.base_ref().location
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(acfg["base_model_name_or_path"]), str(out))
    torch.testing.assert_close(logits(plain), logits(Interpolator(run).at(0.25)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_virtual_token_methods_rewind_to_checkpoints_only(name, tmp_path, model_dir, data_file):
    from sftlab.interpolate import export_at, model_at, search
    from sftlab.runs import Run
    from sftlab.train.rundir import write_config

    cfg = tiny_config(tmp_path, model_dir, data_file, {"name": name})
    cfg.run_dir.mkdir(parents=True)
    write_config(cfg.run_dir, cfg)
    run = Run(cfg.run_dir)
    for call in (lambda: model_at(run, None, 0.5), lambda: export_at(run, None, 0.5, tmp_path / "out"),
                 lambda: search(run, None, [0.5, 1.0], lambda *a: None, "knee")):
        with pytest.raises(SftlabError) as e:
            call()
        msg = str(e.value)
        assert "checkpoints only" in msg and name in msg and "\n" not in msg


def test_alpha_outside_the_segment_is_refused(trained):
    from sftlab.interpolate import model_at
    from sftlab.runs import Run

    with pytest.raises(SftlabError, match=r"alpha must be in \[0, 1\]"):
        model_at(Run(trained("lora")), None, 1.5)


def test_search_scores_the_grid_and_applies_the_policy(trained):
    from sftlab.interpolate import search
    from sftlab.runs import Run
    from sftlab.trajectory import rewind

    run = Run(trained("lora"))
    want0, want1 = base_logits(run), logits(run.load()[0])
    seen = []

    def score_fn(model, tok, step, alpha):  # task: closeness to the checkpoint; retention: to the base
        out = logits(model)
        seen.append((step, alpha))
        return Point(-1, -(out - want1).abs().max().item(), -(out - want0).abs().max().item())

    res = search(run, None, [1.0, 0.5, 0.25, 0.75], score_fn, "max_task_with_retention_loss", max_loss=0.0)
    assert seen == [(4, 0.0), (4, 0.25), (4, 0.5), (4, 0.75), (4, 1.0)]  # the base (alpha 0) is scored too
    assert [(p.step, p.alpha) for p in res.points] == seen
    assert res.choice.point.alpha == 0.0 and res.points[-1].task == pytest.approx(0.0, abs=1e-5)
    weighted = search(run, None, [0.5, 1.0], score_fn, "weighted", w=1.0)
    assert weighted.choice.point.alpha == 1.0
    assert weighted.choice == rewind(weighted.points, "weighted", w=1.0)
    base = Point(0, -10.0, 0.0)
    with_base = search(run, None, [0.5, 1.0], score_fn, "knee", base=base)
    assert with_base.points[0] is base and [p.alpha for p in with_base.points[1:]] == [0.5, 1.0]
