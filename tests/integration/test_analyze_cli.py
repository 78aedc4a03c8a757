"""`sftlab analyze` end to end on tiny runs: the LoRA update seen through the real merge path is B·A·scale,
files and summary are written for every step, and prompt tuning is analysed in activation space only."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, memorisable_chats, tiny_config, write_jsonl
from sftlab.cli import main
from sftlab.config import parse_probes
from sftlab.train.loop import Trainer

ALPHA, R = 8.0, 4


def train(tmp, model_dir, data, name, method):
    cfg = tiny_config(tmp, model_dir, data, method=method, run={"name": name},
                      train={"steps": 4, "batch_size": 4, "lr": 1e-2, "threads": 1}, checkpoint={"every": 2})
    cfg.probes = parse_probes([{"name": "heldout_loss", "path": str(data)}])  # its rows are the task prompts
    t = Trainer(cfg)
    t.run()
    return t.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    model_dir = build_tiny_model(tmp / "model")
    data = write_jsonl(tmp / "chats.jsonl", memorisable_chats(12))
    lora = train(tmp, model_dir, data, "lora", {"name": "lora", "r": R, "alpha": ALPHA})
    prompt = train(tmp, model_dir, data, "prompt", {"name": "prompt", "num_virtual_tokens": 4})
    oft = train(tmp, model_dir, data, "oft", {"name": "oft", "block_size": 16})
    return {"lora": lora, "prompt": prompt, "oft": oft, "model": model_dir, "data": data}


def test_lora_update_through_the_merge_path_is_b_a_times_scale(runs):
    from safetensors.torch import load_file

    from sftlab.analysis.run import changed_linears, linear_names, load_tuned
    from sftlab.models import load_model
    from sftlab.runs import Run

    run = Run(runs["lora"])
    base = load_model(run.base_ref(), "float32")
    tuned, merged = load_tuned(run, 4)
    assert merged
    adapter = load_file(str(run.dir / run.checkpoint(4)["path"] / "adapter_model.safetensors"))
    b_mods, t_mods = dict(base.named_modules()), dict(tuned.named_modules())
    names = linear_names(base)
    assert sorted(changed_linears(base, tuned, names)) == sorted(names)  # all-linear: every one moved
    for name in names:
        key = name.replace("model.", "base_model.model.model.", 1)
        a, b = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]  # (r, in), (out, r)
        dw = t_mods[name].weight - b_mods[name].weight
        want = (ALPHA / R) * b @ a
        assert want.abs().max() > 0
        torch.testing.assert_close(dw, want, atol=2e-6, rtol=1e-4)


def test_analyze_all_steps_writes_weights_activations_and_summary(runs, capsys):
    d = runs["lora"]
    assert main(["analyze", str(d), "--steps", "all", "--layers", "all", "--texts", "4", "--max-length", "32",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "eff.rank" in out and "drift gen" in out
    summary = json.loads((d / "analysis" / "summary.json").read_text())
    assert list(summary["steps"]) == ["2", "4"] and summary["weight_change"] is True
    for step in (2, 4):
        w = json.loads((d / "analysis" / f"weights-step-{step:06d}.json").read_text())
        assert len(w["modules"]) == 14  # 2 layers x 7 linear modules
        for m in w["modules"].values():
            assert m["changed"] and m["effective_rank"] <= R + 1e-3 and m["energy90_rank"] <= R
            assert len(m["dp"]) == len(m["e"]) == len(m["spectrum_index"])
        a = json.loads((d / "analysis" / f"activations-step-{step:06d}.json").read_text())
        assert set(a["sets"]) == {"general", "task"} and a["layers"] == [0, 1]
        for s in a["sets"].values():
            for layer in s["layers"].values():
                assert set(layer) == {"block", "attn", "mlp"}
                assert 0 < layer["block"]["cosine_drift"] < 1 and layer["block"]["cka"] <= 1 + 1e-9
            assert len(s["response"]) == 14 and all(v > 0 for v in s["response"].values())
        e = summary["steps"][str(step)]
        assert "heldout_loss" in e["scores"] and set(e["weights"]["per_layer"]) == {"0", "1"}
        assert set(e["activations"]["task"]["per_layer"]) == {"0", "1"}
    # a later call for one step keeps the others
    assert main(["analyze", str(d), "--steps", "2", "--no-activations", "--no-progress"]) == 0
    again = json.loads((d / "analysis" / "summary.json").read_text())
    assert list(again["steps"]) == ["2", "4"] and "activations" in again["steps"]["4"]
    from sftlab.report import render_report

    page = render_report(d, d / "report.html").read_text()
    geo = page[page.index('<section id="geometry">'):]
    geo = geo[:geo.index("</section>")]
    for title in ("activation drift per layer, general text", "effective rank of dW per layer",
                  "intruder dimensions per layer", "retention view", "adaptation view"):
        assert title in geo
    assert geo.count("<svg") >= 7


def test_prompt_tuning_is_analysed_in_activation_space_only(runs):
    d = runs["prompt"]
    assert main(["analyze", str(d), "--texts", "3", "--max-length", "24", "--no-progress"]) == 0
    w = json.loads((d / "analysis" / "weights-step-000004.json").read_text())
    assert w["weight_change"] is False and w["modules"] == {} and "virtual tokens" in w["note"]
    a = json.loads((d / "analysis" / "activations-step-000004.json").read_text())
    block = a["sets"]["general"]["layers"]["1"]["block"]
    assert block["cosine_drift"] > 0 and a["sets"]["general"]["response"] == {}


def test_oft_rotations_keep_the_spectrum_and_report_alignment(runs):
    from sftlab.analysis import weights as wts
    from sftlab.analysis.run import load_tuned
    from sftlab.models import load_model
    from sftlab.runs import Run

    d = runs["oft"]
    assert main(["analyze", str(d), "--no-activations", "--no-progress"]) == 0
    w = json.loads((d / "analysis" / "weights-step-000004.json").read_text())
    assert w["weight_change"] and len(w["modules"]) == 14
    for m in w["modules"].values():
        assert m["changed"] and 0 < m["alignment_mean"] <= 1 and len(m["alignment"]) == len(m["dp"])
    run = Run(d)
    base = dict(load_model(run.base_ref(), "float32").named_modules())
    tuned = dict(load_tuned(run, 4)[0].named_modules())
    name = "model.layers.0.self_attn.q_proj"
    # merged through PEFT, an OFT update is a rotation of the input: same singular values, turned vectors
    torch.testing.assert_close(wts.svdvals(tuned[name].weight), wts.svdvals(base[name].weight), atol=1e-4, rtol=1e-4)
    assert min(w["modules"][name]["alignment"]) < 0.9999


@pytest.mark.slow  # three more trainings
@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "ia3"}, {"name": "prefix", "num_virtual_tokens": 4}])
def test_other_methods_analyse_end_to_end(runs, tmp_path, method):
    """Full weights, IA3's rescaling (only some modules change) and prefix tuning (past key/values)."""
    d = train(tmp_path, runs["model"], runs["data"], method["name"], method)
    assert main(["analyze", str(d), "--texts", "2", "--max-length", "16", "--no-progress"]) == 0
    w = json.loads((d / "analysis" / "weights-step-000004.json").read_text())
    a = json.loads((d / "analysis" / "activations-step-000004.json").read_text())
    assert a["sets"]["general"]["layers"]["1"]["block"]["cosine_drift"] > 0
    if method["name"] == "prefix":
        assert not w["weight_change"] and w["modules"] == {}
        return
    changed = [n for n, m in w["modules"].items() if m["changed"]]
    assert changed and set(a["sets"]["general"]["response"]) == set(changed)
    if method["name"] == "ia3":  # keys, values and the MLP's down projection only
        assert len(changed) < len(w["modules"])
        assert all(n.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "down_proj") for n in changed)


def test_bad_steps_is_a_one_line_error(runs, capsys):
    assert main(["analyze", str(runs["lora"]), "--steps", "3"]) == 2
    assert "no checkpoint at step(s) [3]" in capsys.readouterr().err
