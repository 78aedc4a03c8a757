"""Contract tests generated from the method registry: a newly registered method is tested here
without writing a test (add an entry to OVERRIDES only if the defaults do not suit it). A method registered
only inside one test file (tests/unit/test_toy_method.py) runs the same tests as functions, via train_method.

For every registered method:
  (a) training on a small memorisable task at least halves the eval loss;
  (b) the last checkpoint, loaded back with sftlab (and, for PEFT methods, with plain PEFT), gives the
      in-memory trained model's logits;
  (c) the run records its trainable parameter count and share (< 1 for PEFT methods, 1 for full);
  (d) methods that prepend virtual tokens refuse packing with a ConfigError.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import build_tiny_model, memorisable_chats, write_jsonl
from sftlab.config import config_from_dict
from sftlab.configtools import ConfigError
from sftlab.methods import METHODS

METHOD_NAMES = METHODS.names()

# Steps and learning rate per method; anything not listed uses DEFAULT. Soft prompts and rescaling
# vectors move the output only through normalised attention inputs, so they need far higher rates
# (Lester et al. use 0.3 for prompt tuning) and, for prompts, more virtual tokens.
DEFAULT = {"steps": 60, "lr": 1e-2, "options": {}}
OVERRIDES: dict[str, dict] = {
    "full": {"lr": 3e-3},
    "ia3": {"lr": 1e-1},
    "prefix": {"lr": 1e-1},
    "prompt": {"steps": 100, "lr": 3e-1, "options": {"num_virtual_tokens": 32}},
}


def settings(name: str) -> dict:
    return {**DEFAULT, **OVERRIDES.get(name, {})}


def build_learnable_model(folder: Path, hidden: int = 64, init: float = 0.1, embed_std: float = 0.01,
                          logit_scale: float = 1.5) -> Path:
    """A 2-layer Llama whose output can be steered by a small adapter.

    With the usual 0.02 init, a random model's logits are h·e with |h| = sqrt(hidden) after the final
    RMSNorm and |e| = 0.02·sqrt(hidden): the largest logit any frozen-head method can reach is
    0.02·hidden ≈ 1.3, so no PEFT method can move the loss far from ln(vocab). Here the tied embeddings
    are small (so the residual stream is dominated by what the layers - and adapters - write) and the
    final norm's weight is raised so random logits have std `logit_scale`: the start loss stays near
    ln(vocab) + logit_scale²/2 ≈ 12 while a well-aligned hidden state can score ~hidden·logit_scale/sqrt(hidden).
    """
    def adjust(model):
        model.model.embed_tokens.weight.normal_(0.0, embed_std)
        model.model.norm.weight.fill_(logit_scale / (math.sqrt(hidden) * embed_std))

    return build_tiny_model(folder, hidden=hidden, init=init, adjust=adjust)


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory) -> Path:
    return build_learnable_model(tmp_path_factory.mktemp("learnable-model"))


@pytest.fixture(scope="module")
def chats_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", memorisable_chats(24))


def method_config(tmp: Path, model_dir: Path, data_file: Path, name: str, **extra):
    s = settings(name)
    d = {
        "run": {"name": name, "output_dir": str(tmp / "runs"), "seed": 0},
        "model": {"path": str(model_dir)},
        "method": {"name": name, **s["options"]},
        # The eval set is the memorisable training set: the test asks "can it learn", not "does it generalise".
        "data": {"train": [{"path": str(data_file)}], "eval": [{"path": str(data_file)}], "max_length": 64},
        "train": {"steps": s["steps"], "lr": s["lr"], "batch_size": 8, "schedule": "cosine", "threads": 1},
        "checkpoint": {"every": 0},
        "logging": {"progress": False, "tensorboard": False},
    }
    for key, val in extra.items():
        d[key] = {**d.get(key, {}), **val}
    return config_from_dict(d)


@dataclass
class Trained:
    name: str
    trainer: object
    run_dir: Path
    start_eval: float
    final_eval: float


_TRAINED: dict[str, Trained] = {}  # one training per method, also for tests that pick a method indirectly


@pytest.fixture(scope="module", params=METHOD_NAMES)
def trained(request, tmp_path_factory, learnable_model_dir, chats_file) -> Trained:
    return train_method(request.param, tmp_path_factory, learnable_model_dir, chats_file)


def train_method(name: str, tmp_path_factory, learnable_model_dir: Path, chats_file: Path) -> Trained:
    """Train `name` once (with settings(name)) and record its start and final eval loss: the contract tests'
    subject; a test file that registers its own method calls this and then the tests below as functions."""
    from sftlab.objectives import eval_loss
    from sftlab.train.loop import Trainer

    if name in _TRAINED:
        return _TRAINED[name]
    cfg = method_config(tmp_path_factory.mktemp(f"method-{name}"), learnable_model_dir, chats_file, name)
    start = {}

    def after_setup(tr):
        start["eval"] = eval_loss(tr.model, tr.eval_batches, tr.dist.device)["eval_loss"]

    trainer = Trainer(cfg, hooks={"after_setup": after_setup})
    run_dir = trainer.run()
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]
    assert evals and evals[-1]["step"] == cfg.train.steps, "the last step must log an eval"
    _TRAINED[name] = Trained(name, trainer, run_dir, start["eval"], evals[-1]["eval_loss"])
    return _TRAINED[name]


def test_training_halves_eval_loss(trained):
    print(f"{trained.name}: eval loss {trained.start_eval:.3f} -> {trained.final_eval:.3f}")
    assert math.isfinite(trained.final_eval)
    assert trained.final_eval <= 0.5 * trained.start_eval, (
        f"{trained.name}: eval loss {trained.start_eval:.3f} -> {trained.final_eval:.3f}, not halved "
        f"({settings(trained.name)})")


def _logits(model, batch, device):
    import torch

    model.to(device).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def test_checkpoint_reloads_to_identical_logits(trained, learnable_model_dir):
    import torch
    from sftlab.runs import Run

    batch, device = trained.trainer.eval_batches[0], trained.trainer.dist.device
    expected = _logits(trained.trainer.model, batch, device)
    run = Run(trained.run_dir)
    assert run.checkpoints()[-1]["step"] == trained.trainer.total_steps
    loaded, _tok = run.load()
    torch.testing.assert_close(_logits(loaded, batch, device), expected, atol=1e-6, rtol=0)

    if METHODS.get(trained.name).peft:  # the adapter folder is plain PEFT: no sftlab needed to use it
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(learnable_model_dir))
        plain = PeftModel.from_pretrained(base, str(last_checkpoint(trained.run_dir)))
        torch.testing.assert_close(_logits(plain, batch, device), expected, atol=1e-6, rtol=0)


def test_run_records_trainable_share(trained):
    prov = json.loads((trained.run_dir / "provenance.json").read_text())
    model = trained.trainer.model
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert prov["trainable_params"] == n_trainable > 0
    assert prov["total_params"] == sum(p.numel() for p in model.parameters())
    assert prov["trainable_share"] == pytest.approx(n_trainable / prov["total_params"])
    if METHODS.get(trained.name).peft:
        assert 0 < prov["trainable_share"] < 1
    else:
        assert prov["trainable_share"] == 1


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_packing_refused_for_virtual_token_methods(name, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", memorisable_chats(4))
    if METHODS.get(name).packing:
        cfg = method_config(tmp_path, tmp_path, data, name, data={"packing": True})
        assert cfg.data.packing
        return
    with pytest.raises(ConfigError) as e:
        method_config(tmp_path, tmp_path, data, name, data={"packing": True})
    msg = str(e.value)
    assert msg.startswith("data.packing:") and name in msg and "packing=false" in msg and "\n" not in msg


# ---- OFT: exact rotations by default ----------------------------------------------------------------

def test_oft_defaults_to_exact_cayley():
    from sftlab.methods.oft import OFTOptions

    assert OFTOptions().neumann is False


@pytest.mark.parametrize("trained", ["oft"], indirect=True)
def test_oft_learned_blocks_are_rotations(trained):
    import torch
    from peft.tuners.oft.layer import OFTRotationModule

    cfg = json.loads((last_checkpoint(trained.run_dir) / "adapter_config.json").read_text())
    assert cfg["use_cayley_neumann"] is False
    modules = [m for m in trained.trainer.model.modules() if isinstance(m, OFTRotationModule)]
    assert modules
    moved = 0.0
    for m in modules:
        assert m.use_cayley_neumann is False
        with torch.no_grad():
            R = m.get_weight().double()  # block-diagonal (in, in) rotation built from the skew parameters
        eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
        assert (R.T @ R - eye).abs().max().item() <= 1e-5
        moved = max(moved, (R - eye).abs().max().item())
        # the convention rewinding relies on: each block is (I - S)(I + S)^-1 of the stored skew parameters
        with torch.no_grad():
            S = m._pytorch_skew_symmetric(m.weight, m.block_size).double()  # (blocks, b, b)
        I = torch.eye(m.block_size, dtype=S.dtype, device=S.device)
        blocks = (I - S) @ torch.linalg.inv(I + S)
        b = m.block_size
        for i in range(S.shape[0]):
            torch.testing.assert_close(R[i * b:(i + 1) * b, i * b:(i + 1) * b], blocks[i], atol=1e-5, rtol=0)
    assert moved > 1e-3, "training should have rotated something"


def last_checkpoint(run_dir: Path) -> Path:
    from sftlab.runs import Run

    return run_dir / Run(run_dir).checkpoint(None)["path"]


def test_boft_refuses_butterfly_factors_peft_would_silently_drop():
    """Without PEFT's CUDA kernel, PEFT trains one butterfly factor whatever the config says."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.errors import SftlabError
    from sftlab.methods.boft import BOFTOptions, apply

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without the CUDA kernel")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(SftlabError, match="method.n_butterfly_factor"):
        apply(model, BOFTOptions(block_size=4, n_butterfly_factor=2))
