"""DPO runs are runs like any other, on a tiny model: `sftlab pipeline` (SFT, then DPO from it) resumes a stage
that crashed to the same weights; step 0 of the DPO run is the SFT model while retention stays measured
against the original base; offline eval, frontier and rewind (interpolating from the SFT model) work; the
live reference (adapter switched off) trains like the cached one."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from conftest import build_tiny_model, write_jsonl
from sftlab.cli import main
from sftlab.config import config_from_dict
from sftlab.runs import Run
from sftlab.train.loop import Trainer

COLOURS = ["red", "blue", "green", "black", "white", "brown"]


def colour_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = rng.choice(COLOURS)
        w = rng.choice([x for x in COLOURS if x != c])
        out.append({"prompt": f"Item {i} is {c}. Its colour?", "chosen": f"It is {c}.", "rejected": f"It is {w}."})
    return out


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo-runs")
    model_dir = build_tiny_model(tmp / "model")
    pairs = write_jsonl(tmp / "pairs.jsonl", colour_pairs(32, 0))
    held = write_jsonl(tmp / "held.jsonl", colour_pairs(12, 1))
    sft_data = write_jsonl(tmp / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                               for p in colour_pairs(12, 1)])
    general = tmp / "general.txt"
    general.write_text("\n\n".join(f"Passage {i}: the river runs past the old mill and the town of {i}."
                                   for i in range(12)))
    probes = [{"name": "heldout_loss", "path": str(sft_data)}, {"name": "kl_to_base", "path": str(general), "k": 8}]
    common = {"logging": {"progress": False, "tensorboard": False}, "checkpoint": {"every": 2}, "probes": probes}
    data = {"max_length": 48, "template": "raw"}
    sft = {**common, "model": {"path": str(model_dir)}, "method": {"name": "lora", "r": 4},
           "data": {**data, "train": [{"path": str(pairs), "columns": {"chosen": "completion"}}]},
           "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "threads": 1}}
    dpo = {**common, "method": {"name": "lora", "r": 4}, "objective": {"name": "dpo", "beta": 0.5},
           "data": {**data, "train": [{"path": str(pairs)}], "eval": [{"path": str(held)}]},
           "train": {"steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "threads": 1}}
    pipe = tmp / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump({"output_dir": str(tmp / "pipe"), "stages": [
        {"name": "sft", "config": sft}, {"name": "dpo", "from": "sft@last", "config": dpo}]}))  # the last, not the
    # selected checkpoint (sft has probes): the tests below compare with runs started from it
    return tmp, pipe, dpo


@pytest.fixture(scope="module")
def pipeline_run(setup):
    """The pipeline with its DPO stage killed after step 3, then rerun: SFT skipped, DPO resumed."""
    tmp, pipe, _ = setup
    import sftlab.train.loop as loop

    real = loop.train

    def crashing(cfg, resume=False, hooks=None, provenance=None):
        def after_step(trainer, step, metrics):
            if cfg.run.name == "dpo" and step == 3:
                raise Crash("killed")

        return loop.Trainer(cfg, resume, {"after_step": after_step}, provenance).run()

    loop.train = crashing
    try:
        with pytest.raises(Crash):
            main(["pipeline", str(pipe)])
    finally:
        loop.train = real
    assert main(["pipeline", str(pipe)]) == 0
    return tmp / "pipe"


def direct_dpo(tmp, dpo: dict, name: str, **objective):
    d = json.loads(json.dumps(dpo))
    d["run"] = {"name": name, "output_dir": str(tmp / "direct")}
    d["model"] = {"init_from": str(tmp / "pipe" / "sft")}
    d["objective"].update(objective)
    d["probes"] = []
    return Trainer(config_from_dict(d)).run()


def test_resumed_stage_equals_uninterrupted_run(setup, pipeline_run, capsys):
    tmp, pipe, dpo = setup
    state = json.loads((pipeline_run / "pipeline.json").read_text())
    assert set(state) == {"sft", "dpo"} and state["dpo"]["step"] == 6
    direct = direct_dpo(tmp, dpo, "cached")
    assert Run(direct).checkpoint(6)["sha256"] == state["dpo"]["sha256"]
    assert json.loads((direct / "provenance.json").read_text())["data"]["reference"]["status"] == "reused"
    assert main(["pipeline", str(pipe)]) == 0
    assert capsys.readouterr().out.count("skipped") == 2


def test_live_reference_trains_like_the_cached_one(setup, pipeline_run):
    tmp, _, dpo = setup
    cached = direct_dpo(tmp, dpo, "cached2")
    live = direct_dpo(tmp, dpo, "live", reference="disable_adapter")

    def losses(run):
        return [(m["loss"], m["rewards/accuracy"]) for m in map(json.loads, (run / "metrics.jsonl").open())
                if not m.get("eval")]

    a, b = losses(cached), losses(live)
    assert len(a) == 6 and a[0][0] == pytest.approx(0.6931, abs=1e-3)  # LoRA starts at the reference: log 2
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], rel=1e-3)
    assert any(x[0] != a[0][0] for x in a)  # the loss moves (that it learns is tests/integration/test_dpo_pipeline.py)

    def evals(run):
        return [m for m in map(json.loads, (run / "metrics.jsonl").open()) if m.get("eval")][-1]

    ea, eb = evals(cached), evals(live)
    assert ea["eval_pairs"] == 12 and ea["eval_loss"] == pytest.approx(eb["eval_loss"], rel=1e-3)


def test_step_zero_is_the_sft_model_and_retention_is_against_the_base(pipeline_run):
    sft, dpo = Run(pipeline_run / "sft"), Run(pipeline_run / "dpo")
    s = {e["step"]: e["scores"] for e in sft.trajectory()}
    d = {e["step"]: e["scores"] for e in dpo.trajectory()}
    line0 = next(json.loads(x) for x in (dpo.dir / "trajectory.jsonl").open() if json.loads(x).get("scores"))
    assert "shared" not in line0  # the base's shared step-0 scores are not this run's step 0
    for name in ("heldout_loss", "kl_to_base"):
        assert d[0][name]["value"] == pytest.approx(s[4][name]["value"], rel=1e-3, abs=1e-5)
    assert d[0]["kl_to_base"]["value"] > 1e-4  # the SFT model already moved away from the base
    assert d[6]["kl_to_base"]["value"] != d[0]["kl_to_base"]["value"]
    assert dpo.base_ref().sha256 == sft.base_ref().sha256


def test_offline_eval_frontier_and_rewind(pipeline_run, tmp_path, capsys):
    run_dir = pipeline_run / "dpo"
    during = {e["step"]: e["scores"] for e in Run(run_dir).trajectory()}
    assert main(["eval", str(run_dir), "--steps", "0,6"]) == 0
    after = {e["step"]: e["scores"] for e in Run(run_dir).trajectory()}
    for step in (0, 6):
        for name in ("heldout_loss", "kl_to_base"):
            assert after[step][name]["value"] == pytest.approx(during[step][name]["value"], abs=1e-5)
    assert main(["frontier", str(run_dir)]) == 0
    assert "kl_to_base" in capsys.readouterr().out
    dest = tmp_path / "rewound"
    # The knee keeps the base here: six DPO steps do not beat its held-out CI, and the knee (like the retention
    # budget rule) never recommends a checkpoint that is not better than the base. A task floor every checkpoint
    # meets picks one (the least forgetting), and the search interpolates towards it from the SFT model.
    capsys.readouterr()
    assert main(["rewind", str(run_dir), "--search", "--alphas", "0.5,1.0", "-o", str(tmp_path / "knee")]) == 2
    assert "base model (step 0): nothing to export" in capsys.readouterr().err
    assert main(["rewind", str(run_dir), "--policy", "max_retention_with_task", "--min-task", "100", "--search",
                 "--alphas", "0.5,1.0", "-o", str(dest)]) == 0
    assert "chosen: step" in capsys.readouterr().out


def test_interpolation_starts_at_the_sft_model(pipeline_run):
    from sftlab.interpolate import Interpolator

    run = Run(pipeline_run / "dpo")
    interp = Interpolator(run, 6)
    start = run.load_start().eval()
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        a0 = interp.at(0.0)(input_ids=ids).logits
        s0 = start(input_ids=ids).logits
        a1 = interp.at(1.0)(input_ids=ids).logits
    assert torch.allclose(a0, s0, atol=1e-5) and (a1 - s0).abs().max() > 1e-3
