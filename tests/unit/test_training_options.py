"""Training options that change how a step runs, not what it computes (or only within bf16 rounding),
and the logging side of the loop: gradient checkpointing, bf16, eval cadence, TensorBoard, progress,
optional loggers; plus how models are loaded (safetensors only, no remote code, GGUF routing)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import memorisable_chats, tiny_config, write_jsonl
from sftlab.train.loop import Trainer


def weights(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def run(tmp_path, model_dir, name, **sections):
    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
    sections.setdefault("train", {})
    sections["train"] = {"steps": 2, "batch_size": 4, "lr": 1e-2, "threads": 1, **sections["train"]}
    cfg = tiny_config(tmp_path, model_dir, data, run={"name": name}, **sections)
    t = Trainer(cfg)
    t.run()
    return t


def metrics(trainer) -> list[dict]:
    return [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, tiny_model_dir):
    plain = run(tmp_path, tiny_model_dir, "plain")
    ckpt = run(tmp_path, tiny_model_dir, "ckpt", train={"gradient_checkpointing": True})
    wp, wc = weights(plain), weights(ckpt)
    assert max((wp[n] - wc[n]).abs().max().item() for n in wp) <= 1e-6
    assert ckpt.cfg.train.gradient_checkpointing and getattr(ckpt.model, "is_gradient_checkpointing", True)


def test_bf16_autocast_trains_close_to_fp32(tmp_path, tiny_model_dir):
    fp32 = metrics(run(tmp_path, tiny_model_dir, "fp32", train={"steps": 3}))
    bf16 = metrics(run(tmp_path, tiny_model_dir, "bf16", train={"steps": 3, "precision": "bf16"}))
    for a, b in zip(fp32, bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)  # bf16 rounding, not a different computation
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16)


def test_eval_every_k_steps_and_at_the_end(tmp_path, tiny_model_dir):
    t = run(tmp_path, tiny_model_dir, "ev", train={"steps": 5, "eval_every": 2}, data={"eval_fraction": 0.25})
    evals = [r["step"] for r in metrics(t) if r.get("eval")]
    assert evals == [2, 4, 5]
    assert all(r["eval_tokens"] > 0 for r in metrics(t) if r.get("eval"))


def test_tensorboard_and_progress_bar(tmp_path, tiny_model_dir, capfd):
    t = run(tmp_path, tiny_model_dir, "tb", logging={"tensorboard": True, "progress": True})
    assert list((t.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    err = capfd.readouterr().err
    assert "training" in err and "tok_s=" in err and "loss=" in err  # tqdm: loss, tokens/s and ETA


def test_report_to_a_logger_that_is_not_installed_is_skipped_with_advice(tmp_path, tiny_model_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    run(tmp_path, tiny_model_dir, "mlf", logging={"report_to": ["mlflow"]})
    assert "pip install mlflow" in capsys.readouterr().out


def test_models_load_from_safetensors_without_remote_code(tiny_model_dir, monkeypatch):
    import transformers

    from sftlab import models

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    ref = models.resolve_model(str(tiny_model_dir))
    models.load_model(ref)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert ref.source == "local" and len(ref.sha256) == 64


def test_gguf_paths_are_converted_once_into_the_cache(tmp_path, monkeypatch):
    from sftlab import models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")
        return out

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    a = models.resolve_model(str(gguf))
    b = models.resolve_model(str(tmp_path), gguf_file="m.gguf")
    assert a.location == b.location and a.source == "gguf" and calls == [gguf]
    assert a.location.startswith(str(tmp_path / "cache"))


@pytest.mark.slow
def test_embedded_model_is_converted_to_plain_trainable_safetensors():
    from sftlab.models import ensure_default_model

    folder = ensure_default_model()  # converted by `make setup`; converts now otherwise (~40 s)
    cfg = json.loads(open(f"{folder}/config.json").read())
    assert "quantization_config" not in cfg or cfg["quantization_config"] is None
    from safetensors import safe_open

    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        t = f.get_tensor("model.embed_tokens.weight")
    assert t.dtype == torch.float32 and tuple(t.shape) == (49152, 576)
