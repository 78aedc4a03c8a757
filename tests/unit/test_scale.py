"""Quantization and sharding settings: config sections, clear errors, DeepSpeed/accelerate pass-through."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sftlab.config import TrainSection, config_from_dict
from sftlab.config_scale import DistributedSection, QuantizationSection
from sftlab.configtools import ConfigError
from sftlab.errors import ModelError, SftlabError
from sftlab.train import deepspeed, sharding

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def cfg_dict(method="lora", **sections):
    d = {"model": {"path": "x"}, "method": {"name": method}, "data": {"train": [{"path": "d.jsonl"}]}}
    d.update(sections)
    return d


def test_quantization_section_parses_and_defaults():
    cfg = config_from_dict(cfg_dict(quantization={"bits": 4, "quant_type": "fp4", "double_quant": True}))
    assert (cfg.quantization.bits, cfg.quantization.quant_type, cfg.quantization.double_quant) == (4, "fp4", True)
    assert cfg.quantization.enabled
    assert not config_from_dict(cfg_dict()).quantization.enabled
    assert "quantization" in cfg.to_dict() and "distributed" in cfg.to_dict()


@pytest.mark.parametrize("section,method,needle", [
    ({"quantization": {"bits": 3}}, "lora", "quantization.bits"),
    ({"quantization": {"bits": 8, "quant_type": "fp4"}}, "lora", "4-bit"),
    ({"quantization": {"bits": 4}}, "full", "adapter method"),
    ({"quantization": {"bits": 4}, "distributed": {"strategy": "fsdp"}}, "lora", "ddp"),
    ({"distributed": {"strategy": "ddp", "deepspeed_config": "ds.json"}}, "lora", "deepspeed_config"),
])
def test_bad_combinations_say_how_to_fix(section, method, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(cfg_dict(method, **section))


def test_bnb_config_follows_the_section():
    from sftlab.quantize import bnb_config

    c = bnb_config(QuantizationSection(bits=4, quant_type="fp4", double_quant=True), "bfloat16")
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "fp4" and c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.bfloat16  # auto: the model's dtype
    c = bnb_config(QuantizationSection(bits=4, compute_dtype="float16"), "float32")
    assert c.bnb_4bit_compute_dtype == torch.float16
    assert bnb_config(QuantizationSection(bits=8), "float32").load_in_8bit


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    from sftlab import quantize
    from sftlab.quantize import check_backend

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    monkeypatch.setattr(quantize, "_hidden", False)  # ... and not merely hidden by an earlier full-precision load
    with pytest.raises(ModelError, match=r"pip install 'bitsandbytes>=0.46'"):
        check_backend(QuantizationSection(bits=4), CPU)


def test_backend_without_kernels_is_a_clear_error(monkeypatch):
    from sftlab import quantize

    fake = type(sys)("bitsandbytes")
    fake.__version__ = "0.50.0"
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)

    def no_kernel(bnb, q, device):
        raise NotImplementedError("no kernel for 'gemm_4bit' on device cpu")

    monkeypatch.setattr(quantize, "_probe", no_kernel)
    with pytest.raises(ModelError, match=r"cannot run nf4 layers on cpu \(no kernel"):
        quantize.check_backend(QuantizationSection(bits=4), CPU)
    fake.__version__ = "0.44.1"
    with pytest.raises(ModelError, match=">= 0.46"):
        quantize.check_backend(QuantizationSection(bits=8), CPU)


def test_load_model_checks_the_backend_before_loading(monkeypatch, tmp_path):
    from sftlab import quantize
    from sftlab.models import ModelRef, load_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(quantize, "_hidden", False)
    ref = ModelRef(str(tmp_path), str(tmp_path), "", "local")  # nothing there: the check must come first
    with pytest.raises(ModelError, match="needs bitsandbytes"):
        load_model(ref, quant=QuantizationSection(bits=4))


# ---- sharding: where the settings come from -------------------------------------------------------------

ACCEL_FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
              "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "true",
              "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}


def test_one_process_is_never_sharded():
    assert sharding.resolve(DistributedSection(strategy="fsdp"), TrainSection(), 1, CPU, env={}).kind == "none"


def test_auto_reads_accelerate_fsdp_settings():
    s = sharding.resolve(DistributedSection(), TrainSection(), 2, CPU, env=ACCEL_FSDP)
    assert (s.kind, s.reshard_after_forward, s.activation_checkpointing) == ("fsdp", False, True)
    assert s.wrap_classes == ("LlamaDecoderLayer",) and s.source == "accelerate launch"
    assert sharding.resolve(DistributedSection(), TrainSection(), 2, CPU, env={}).kind == "ddp"
    with pytest.raises(SftlabError, match="fsdp_version: 2"):
        sharding.resolve(DistributedSection(), TrainSection(), 2, CPU, env={**ACCEL_FSDP, "FSDP_VERSION": "1"})


def test_cpu_offload_is_refused_on_cpu():
    with pytest.raises(SftlabError, match="cpu_offload"):
        sharding.resolve(DistributedSection(strategy="fsdp", cpu_offload=True), TrainSection(), 2, CPU, env={})
    s = sharding.resolve(DistributedSection(strategy="fsdp", cpu_offload=True), TrainSection(), 2,
                         torch.device("cuda", 0), env={})
    assert s.cpu_offload


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.json", 2), ("deepspeed_zero3.json", 3)])
def test_shipped_deepspeed_configs_translate(name, stage, tmp_path):
    path = REPO / "configs" / "accelerate" / name
    s = sharding.resolve(DistributedSection(strategy="deepspeed", deepspeed_config=str(path)), TrainSection(), 8,
                         CPU, env={})
    assert s.kind == "fsdp" and s.reshard_after_forward == (stage == 3) and not s.cpu_offload
    assert f"ZeRO-{stage}" in s.source
    # the same file named by accelerate's YAML (deepspeed_config_file) arrives through the environment
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    assert sharding.resolve(DistributedSection(), TrainSection(), 8, CPU, env=env) == s


def test_accelerate_yaml_points_at_a_shipped_json():
    import yaml

    for stage in (2, 3):
        y = yaml.safe_load((REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
        assert (REPO / y["deepspeed_config"]["deepspeed_config_file"]).is_file()
    f = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp2.yaml").read_text())
    assert f["distributed_type"] == "FSDP" and f["fsdp_config"]["fsdp_version"] == 2


def ds(**kw):
    return {"zero_optimization": {"stage": 3}, **kw}


@pytest.mark.parametrize("config,needle", [
    (ds(train_micro_batch_size_per_gpu=8), "train.batch_size"),
    (ds(gradient_accumulation_steps=4), "train.grad_accum"),
    (ds(train_batch_size=64), "processes"),
    (ds(gradient_clipping=0.5), "train.max_grad_norm"),
    (ds(bf16={"enabled": True}), "train.precision"),
    (ds(fp16={"enabled": True}), "bf16"),
    (ds(optimizer={"type": "Lamb"}), "AdamW"),
    (ds(optimizer={"type": "AdamW", "params": {"lr": 1e-3}}), "train.lr"),
    (ds(scheduler={"type": "WarmupLR"}), "train.schedule"),
    (ds(activation_checkpointing={}), "activation_checkpointing"),
    ({"zero_optimization": {"stage": 1}}, "stages 2 and 3"),
    (ds(zero_optimization={"stage": 3, "offload_param": {"device": "nvme"}}), "nvme"),
])
def test_deepspeed_values_that_disagree_are_refused(config, needle):
    with pytest.raises(SftlabError, match=needle):
        deepspeed.to_sharding(config, TrainSection(), 2, "ds.json")


def test_deepspeed_auto_and_agreeing_values_pass():
    train = TrainSection(batch_size=2, grad_accum=3, precision="bf16", lr=1e-4)
    config = ds(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3, train_batch_size=24,
                gradient_clipping=1.0, bf16={"enabled": True}, steps_per_print=10,
                optimizer={"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999]}},
                zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    s = deepspeed.to_sharding(config, train, 4, "ds.json")
    assert (s.reshard_after_forward, s.cpu_offload) == (False, True)


def test_deepspeed_config_file_errors(tmp_path):
    with pytest.raises(SftlabError, match="not found"):
        deepspeed.load_config(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{stage: 3")
    with pytest.raises(SftlabError, match="JSON"):
        deepspeed.load_config(str(tmp_path / "bad.json"))
    with pytest.raises(SftlabError, match="deepspeed_config"):
        sharding.resolve(DistributedSection(strategy="deepspeed"), TrainSection(), 2, CPU, env={})
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}  # YAML-only accelerate settings, no JSON
    with pytest.raises(SftlabError, match="train.grad_accum"):
        sharding.resolve(DistributedSection(), TrainSection(), 2, CPU, env=env)
    env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = "1"
    assert sharding.resolve(DistributedSection(), TrainSection(), 2, CPU, env=env).reshard_after_forward


def test_sharded_runs_refuse_what_they_cannot_do():
    from sftlab.methods import METHODS

    s = sharding.Sharding("fsdp")
    cfg = config_from_dict(cfg_dict(probes=[{"name": "kl_to_base"}]))
    with pytest.raises(SftlabError, match="scoring.during_training=false"):
        sharding.check_run(cfg, s, METHODS.get("lora"))
    cfg = config_from_dict(cfg_dict("prompt"))
    with pytest.raises(SftlabError, match="virtual tokens"):
        sharding.check_run(cfg, s, METHODS.get("prompt"))
    sharding.check_run(config_from_dict(cfg_dict()), s, METHODS.get("lora"))  # plain LoRA: fine
