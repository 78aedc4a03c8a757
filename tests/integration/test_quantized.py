"""QLoRA on CPU with bitsandbytes' CPU backend (>= 0.46): 4-bit NF4/FP4 and 8-bit bases under LoRA and OFT.

Skipped with the reason when bitsandbytes (or its CPU backend) is missing; tests/unit/test_scale.py covers the
errors. Checks: the base really is quantized, the loss falls, the checkpoint is a plain PEFT adapter, and W0 =
the dequantized base: the merged checkpoint (what rewinding, interpolation and export load) computes what
the trained quantized model computes.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import memorisable_chats, tiny_config, write_jsonl
from sftlab.config_scale import QuantizationSection
from sftlab.errors import ModelError

bnb = pytest.importorskip("bitsandbytes")
try:
    from sftlab.quantize import check_backend

    check_backend(QuantizationSection(bits=4), torch.device("cpu"))
    check_backend(QuantizationSection(bits=8), torch.device("cpu"))
except ModelError as e:  # pragma: no cover - depends on the installed bitsandbytes
    pytest.skip(str(e), allow_module_level=True)

# bitsandbytes' own chatter (8-bit casts activations to fp16; a missing optional kernels package)
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt")]

# On CPU bitsandbytes 0.50 runs the 4-bit matmul in bfloat16 whatever compute_dtype says, and LLM.int8 rounds the
# activations to int8: the dequantized model reproduces the quantized one to that rounding, not bitwise.
TOL = {4: 2e-2, 8: 5e-2}


@pytest.mark.parametrize("quant,method", [
    ({"bits": 4, "quant_type": "nf4", "double_quant": True}, {"name": "lora", "r": 4}),
    ({"bits": 4, "quant_type": "fp4"}, {"name": "oft", "block_size": 16}),
    ({"bits": 8}, {"name": "lora", "r": 4}),
], ids=["nf4-dq-lora", "fp4-oft", "int8-lora"])
def test_quantized_run_trains_and_w0_is_the_dequantized_base(tmp_path, tiny_model_dir, quant, method):
    from sftlab.runs import Run
    from sftlab.train.loop import Trainer

    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
    cfg = tiny_config(tmp_path, tiny_model_dir, data, method, quantization=quant,
                      train={"steps": 6, "lr": 1e-2, "threads": 1}, checkpoint={"every": 3})
    trainer = Trainer(cfg)
    trainer.run()
    q_proj = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    base_layer = getattr(q_proj, "base_layer", q_proj)
    assert type(base_layer).__name__ == ("Linear4bit" if quant["bits"] == 4 else "Linear8bitLt")
    assert base_layer.weight.dtype in (torch.uint8, torch.int8)

    losses = [json.loads(x)["loss"] for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.1, losses
    ckpt = cfg.run_dir / "checkpoints" / "step-000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]

    run = Run(cfg.run_dir)
    merged, _ = run.load(6, merge=True)  # the path rewinding, interpolation and export take
    assert all(type(m).__name__ not in ("Linear4bit", "Linear8bitLt") for m in merged.modules())
    ids = torch.tensor([[1, 345, 2890, 17, 904, 33, 2, 511]])
    trainer.model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = trainer.model(input_ids=ids).logits
        w0_path = merged(input_ids=ids).logits
        start = run.load_start()(input_ids=ids).logits
    assert (trained - w0_path).abs().max().item() < TOL[quant["bits"]]
    # the step-0 model is the dequantized base, not the full-precision one (which the adapter never saw)
    from sftlab.models import ModelRef, load_model

    full = load_model(ModelRef(str(tiny_model_dir), str(tiny_model_dir), "", "local"))
    with torch.no_grad():
        fp = full(input_ids=ids).logits
    deq = run.load_start()
    layer = deq.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(layer, full.model.layers[0].self_attn.q_proj.weight)
    assert (start - fp).abs().max().item() > 0  # quantization error is real ...
    assert (start - fp).abs().max().item() < 1.0  # ... and small


def test_step0_scores_of_a_quantized_base_are_kept_apart(tmp_path, tiny_model_dir):
    from sftlab.models import ModelRef
    from sftlab.scoring import base_scores_file, context_for

    data = write_jsonl(tmp_path / "chats.jsonl", memorisable_chats(8))
    plain = tiny_config(tmp_path, tiny_model_dir, data)
    quant = tiny_config(tmp_path, tiny_model_dir, data, quantization={"bits": 4})
    ref = ModelRef(str(tiny_model_dir), str(tiny_model_dir), "abc", "local")
    assert base_scores_file(plain, ref) != base_scores_file(quant, ref)
    assert context_for(plain, ref).base_id != context_for(quant, ref).base_id


def test_gpu_qlora_benchmark_runs_tiny_on_cpu(tmp_path):
    """benchmarks/gpu_qlora.py end to end on a toy shape: both rows, falling losses, the JSON the lead reads."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_qlora.py"
    spec = importlib.util.spec_from_file_location("gpu_qlora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_qlora.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["lora_bf16", "qlora_nf4"] and not result["skipped"]
    for row in result["rows"]:
        assert len(row["losses"]) == 8 and row["losses"][-1] < row["losses"][0] - 0.3, row
