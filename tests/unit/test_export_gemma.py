"""GGUF export of Gemma-3: a tiny random Gemma3ForCausalLM written as a `gemma3` GGUF file and read back by
transformers (`gguf_file=`) gives the same logits (f32 within 1e-4, f16 the same argmax everywhere and a bound,
q8_0 a bound); a LoRA run on it exported through the CLI does too; a SentencePiece-style tokenizer (byte fallback,
no source GGUF) is rebuilt as tokenizer.ggml.model llama and encodes as before; a Gemma the format cannot state is
refused in one line. The real Gemma-3-270M round trip is the slow test at the end (skips until fetched).

The tiny model has the layout a gemma3 GGUF implies, because neither llama.cpp nor transformers' loader reads
more: 6 layers (every 6th full attention), head_dim = query_pre_attn_scalar = 256 (the loader's default scalar;
llama.cpp scales by 1/sqrt(head_dim)), sliding-layer rope base 10000. Its norms are random, so storing `w + 1`
(and the loader's `- 1`) is exercised, and the sliding window (4) is shorter than the prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_jsonl
from sftlab.cli import main
from test_gemma import build_tiny_gemma, desk_chats, fetched_gemma

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PROMPT = "Which desk code does this go to?\n\nArticle number 7. The river runs past the mill"
# max |logit difference| against the fp32 model, measured (logits up to ~8; the final norm's 1 + w is ~19, which
# magnifies the head's rounding): f32 0, f16 0.014 (base) / 0.009 (LoRA run), q8_0 0.24; the bounds leave room for
# other seeds and platforms.
BOUNDS = {"f32": 1e-4, "f16": 5e-2, "q8_0": 1.0}
HIDDEN = 64


def gguf_gemma_config(vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
            "sliding_window": 4, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 2, "max_position_embeddings": 1024}


def build_gguf_gemma(folder: Path, seed: int = 0) -> Path:
    """The tiny Gemma of test_gemma in the layout a gemma3 GGUF implies, its norms random (0.2): storing w + 1 is
    exercised."""
    return build_tiny_gemma(folder, seed, config=gguf_gemma_config, norm_std=0.2)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return build_gguf_gemma(tmp_path_factory.mktemp("gguf-gemma"))


def _logits(model, tok):
    import torch

    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits[0]


def _reload(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _check(got, want, quant: str) -> float:
    import torch

    diff = (got - want).abs().max().item()
    print(f"GGUF {quant}: max abs logit difference {diff:.3g} (logits up to {want.abs().max().item():.3g})")
    assert diff <= BOUNDS[quant], f"{quant}: max abs logit difference {diff:.3g}"
    if quant != "q8_0":
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    return diff


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_tiny_gemma_round_trip(gemma_dir, tmp_path, quant):
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.export.gguf import write_gguf

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(gemma_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gemma_dir))
    path = write_gguf(model, tok, tmp_path / f"g-{quant}.gguf", quant)
    back, gtok = _reload(path)
    assert back.config.model_type == "gemma3_text" and back.config.layer_types == model.config.layer_types
    _check(_logits(back, tok), _logits(model, tok), quant)
    text = "Hello wörld  123\n"
    assert gtok(text).input_ids == tok(text).input_ids  # BOS in front, as the tokenizer's template adds it
    fields = GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.attention.sliding_window"].contents() == 4
    assert fields["gemma3.attention.key_length"].contents() == 256
    names = {t.name for t in GGUFReader(str(path)).tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_ffw_norm.weight", "blk.5.post_attention_norm.weight"} <= names
    assert "output.weight" not in names  # tied head


def test_tiny_gemma_lora_run_exports_through_the_cli(gemma_dir, tmp_path):
    import torch

    from sftlab.config import config_from_dict
    from sftlab.runs import Run
    from sftlab.train.loop import Trainer

    torch.set_num_threads(1)
    data = write_jsonl(tmp_path / "d.jsonl", desk_chats(16))
    cfg = config_from_dict({
        "run": {"name": "lora", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"path": str(gemma_dir)},
        "method": {"name": "lora", "r": 4, "target_modules": ["all-linear"]},
        "data": {"train": [{"path": str(data)}], "max_length": 64},
        "train": {"steps": 6, "lr": 1e-2, "batch_size": 4, "threads": 1},
        "checkpoint": {"every": 0}, "logging": {"progress": False, "tensorboard": False}})
    run_dir = Trainer(cfg).run()
    merged, tok = Run(run_dir).load(None, merge=True)
    want = _logits(merged.to(torch.float32), tok)
    from transformers import AutoModelForCausalLM

    base = _logits(AutoModelForCausalLM.from_pretrained(str(gemma_dir), dtype=torch.float32), tok)
    assert (want - base).abs().max().item() > 0.05  # the LoRA moved the model: the export is not the base
    for quant in ("f32", "f16"):
        out = tmp_path / f"gguf-{quant}"
        assert main(["export", str(run_dir), "--format", "gguf", "--quant", quant, "-o", str(out)]) == 0
        back, _ = _reload(next(out.glob("*.gguf")))
        _check(_logits(back, tok), want, quant)


def sentencepiece_style_tokenizer():
    """A tiny BPE shaped like Gemma's HF tokenizer: spaces normalized to ▁, byte fallback through <0xNN> tokens,
    <pad> <eos> <bos> <unk> at ids 0-3, BOS added by the template; no GGUF source to copy arrays from."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    text = ["the river runs past the old mill and the town", "Which desk code does this go to? Article 7."] * 20
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
    """tokenizer.ggml.model llama rebuilt from the HF tokenizer (scores by id, byte tokens typed BYTE): transformers'
    Gemma reader recovers the merges from the token order and encodes every text as the original does."""
    import torch
    from gguf import GGUFReader, TokenType
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from sftlab.export.gguf import write_gguf

    torch.set_num_threads(1)
    tok = sentencepiece_style_tokenizer()
    model = Gemma3ForCausalLM(Gemma3TextConfig(**gguf_gemma_config(len(tok)))).eval()
    path = write_gguf(model, tok, tmp_path / "spm.gguf", "f32")
    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[4] == TokenType.BYTE and types[2] == TokenType.CONTROL and TokenType.NORMAL in types
    back, gtok = _reload(path)
    for text in ("the river runs past the old mill", "Which desk code, ünï 12345  x\n", "a town"):
        ids = tok(text).input_ids
        assert gtok(text).input_ids == ids and ids[0] == 2
        assert gtok.decode(ids, skip_special_tokens=True) == text  # byte fallback decodes ü back
    ids = torch.tensor([tok("the river runs past the old mill and the town").input_ids])
    with torch.no_grad():
        assert (back.eval()(ids).logits - model(ids).logits).abs().max().item() <= 1e-4


def test_gemma_layout_the_format_cannot_state_is_refused(tmp_path):
    from transformers import Gemma3TextConfig

    from sftlab.errors import SftlabError
    from sftlab.export.gguf import arch_for

    cfg = Gemma3TextConfig(**{**gguf_gemma_config(100), "num_hidden_layers": 2,
                              "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(SftlabError, match="every 6th layer") as err:
        arch_for(cfg)
    assert "\n" not in str(err.value) and "--format hf" in str(err.value)
    with pytest.raises(SftlabError, match="query_pre_attn_scalar"):
        arch_for(Gemma3TextConfig(**{**gguf_gemma_config(100), "query_pre_attn_scalar": 16}))
    assert arch_for(Gemma3TextConfig(**gguf_gemma_config(100))).name == "gemma3"


# ---- the real model (slow; only once fetched) ------------------------------------------------------------------

@pytest.mark.slow
def test_real_gemma_reexports_with_the_same_logits(tmp_path):
    """Gemma-3-270M as sftlab converted it (fp32), written as an f32 gemma3 GGUF with no training: transformers
    reads it back with the same logits and the same tokenizer (the source file's SentencePiece arrays)."""
    fetched_gemma()
    import torch
    from gguf import GGUFReader

    from sftlab.export.gguf import GGUFMeta, read_pre, write_gguf
    from sftlab.fetch import FETCHABLE, converted_dir
    from sftlab.models import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(1)
    ref = resolve_model("gemma3-270m")
    model, tok = load_model(ref, "float32"), load_tokenizer(ref)
    import json

    source = json.loads((Path(converted_dir(FETCHABLE["gemma3-270m"])) / "sftlab_source.json").read_text())["gguf"]
    path = write_gguf(model, tok, tmp_path / "gemma-f32.gguf", "f32", GGUFMeta("gemma", pre=read_pre(source),
                                                                               source=source))
    ids = tok("The capital of France is Paris, and the capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        want = model.eval()(**ids).logits[0]
    del model
    back, gtok = _reload(path)
    with torch.no_grad():
        got = back.eval()(**ids).logits[0]
    assert (got - want).abs().max().item() <= 1e-4 and torch.equal(got.argmax(-1), want.argmax(-1))
    for text in ("Bonjour, world!  12345 naïve\n\tx", "<start_of_turn>user\nhi<end_of_turn>"):
        assert gtok(text).input_ids == tok(text).input_ids
    src, new = GGUFReader(source).fields, GGUFReader(str(path)).fields
    for key in src:  # every key of Google's file, with the same value (bar what names the file and its quant)
        if key.startswith(("gemma3.", "tokenizer.")):
            assert key in new and new[key].contents() == src[key].contents(), key
