"""A merged Hugging Face causal LM + its tokenizer -> one GGUF file, as llama.cpp's convert_hf_to_gguf.py writes it.

What llama.cpp (and Ollama, and transformers' `gguf_file=` loader) expect of a Llama file:
- tensor names from gguf's own name map (`token_embd.weight`, `blk.N.attn_q.weight`, ...); no `output.weight`
  when the head is tied to the embeddings (the loader reads its absence as tie_word_embeddings);
- Q and K rows permuted per head from HF's rotate-half layout to llama.cpp's interleaved one (the loader's
  LlamaTensorProcessor undoes exactly this permute);
- 1-D tensors (norms) kept f32 whatever the quantization, as convert_hf_to_gguf does;
- the tokenizer as `gpt2` BPE: tokens in id order, token types (special added tokens are CONTROL), merges,
  bos/eos/unk/pad ids, add_bos, and the chat template; generation defaults as `general.sampling.*`.

An architecture is one entry of ARCHS (hyper-parameters + per-tensor transform); others are refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SftlabError

QUANTS = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GGUFArch:
    """How one HF model_type becomes a GGUF architecture."""

    name: str  # general.architecture, also the gguf.MODEL_ARCH key, e.g. "llama"
    check: Callable  # (hf config) -> None: refuse what this writer does not translate
    hparams: Callable  # (writer, hf config) -> None
    tensor: Callable  # (gguf name, np.ndarray, hf config) -> np.ndarray


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _llama_check(cfg) -> None:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        raise SftlabError(f"GGUF export: rope scaling {rope_type!r} is not translated yet (only plain RoPE); "
                          "export as a merged folder (--format hf) and convert it with llama.cpp's "
                          "convert_hf_to_gguf.py")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise SftlabError("GGUF export: Llama with attention/MLP biases is not translated yet; export as a "
                          "merged folder (--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py")


def _llama_hparams(w, cfg) -> None:
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_rope_dimension_count(_head_dim(cfg))
    if _head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(_head_dim(cfg))
        w.add_value_length(_head_dim(cfg))


def permute_qk(weights, n_head: int):
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved pairs, per head. weights: [n_head*head_dim, in]."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama_tensor(name: str, data, cfg):
    if name.endswith("attn_q.weight"):
        return permute_qk(data, cfg.num_attention_heads)
    if name.endswith("attn_k.weight"):
        return permute_qk(data, cfg.num_key_value_heads or cfg.num_attention_heads)
    return data


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", _llama_check, _llama_hparams, _llama_tensor),
}


def arch_for(cfg) -> GGUFArch:
    arch = ARCHS.get(getattr(cfg, "model_type", ""))
    if arch is None:
        raise SftlabError(f"GGUF export: model type {cfg.model_type!r} is not supported yet (supported: "
                          f"{', '.join(sorted(ARCHS))}); export a merged folder (--format hf) and convert it "
                          "with llama.cpp's convert_hf_to_gguf.py")
    arch.check(cfg)
    return arch


# ---- tensors ------------------------------------------------------------------------------------------------

def _encode(data, quant: str):
    """(array to write, its GGML type): 1-D tensors stay f32; a q8_0/bf16 row that does not fill whole blocks
    falls back to f16 (llama.cpp does the same)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim < 2 or quant == "f32":
        return data, Q.F32
    if quant == "f16":
        return data.astype(np.float16), Q.F16
    qtype = Q.BF16 if quant == "bf16" else Q.Q8_0
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), Q.F16
    return quantize(data, qtype), qtype


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[quant]


def _add_tensors(w, model, arch: GGUFArch, quant: str) -> int:
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], int(cfg.num_hidden_layers))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n = 0
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # absent output.weight = tied head, for llama.cpp and transformers alike
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SftlabError(f"GGUF export: no GGUF name for tensor {hf_name!r} of a {arch.name} model")
        data = arch.tensor(name, tensor.detach().float().cpu().numpy(), cfg)
        arr, qtype = _encode(data, quant)
        w.add_tensor(name, arr, raw_dtype=qtype)
        n += 1
    return n


# ---- tokenizer and generation settings -------------------------------------------------------------------

def _add_tokenizer(w, tok, vocab_size: int, pre: str) -> None:
    from gguf import TokenType

    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE":
        raise SftlabError(f"GGUF export: a {spec['model'].get('type')} tokenizer is not translated yet (only "
                          "byte-level BPE, the gpt2 kind)")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    if max(by_id) >= vocab_size:
        raise SftlabError(f"GGUF export: the tokenizer has ids up to {max(by_id)} but the model's embedding has "
                          f"{vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):  # rows beyond the tokenizer (padding) get placeholder tokens, as llama.cpp does
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        if getattr(tok, key, None) is not None:
            add(int(getattr(tok, key)))
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


def _add_sampling(w, gen: dict) -> None:
    """The base's generation defaults (generation_config.json) as llama.cpp's general.sampling.* keys."""
    if not gen.get("do_sample"):
        return
    if gen.get("temperature") is not None:
        w.add_sampling_temp(float(gen["temperature"]))
    if gen.get("top_p") is not None:
        w.add_sampling_top_p(float(gen["top_p"]))
    if gen.get("top_k") is not None:
        w.add_sampling_top_k(int(gen["top_k"]))
    if gen.get("repetition_penalty") is not None:
        w.add_sampling_penalty_repeat(float(gen["repetition_penalty"]))


# ---- the file -----------------------------------------------------------------------------------------------

@dataclass
class GGUFMeta:
    """What the file says about itself beyond weights and tokenizer."""

    name: str
    license: str = ""
    base_repo: str = ""  # the base model's origin (hub id), as general.base_model.0.repo_url
    pre: str = "default"  # llama.cpp's pre-tokenizer name (the GGUF source's, when the base came from one)
    generation: dict | None = None  # the base's generation_config.json


def write_gguf(model, tok, path: str | Path, quant: str = "f16", meta: GGUFMeta | None = None) -> Path:
    """Write `model` (a plain, merged HF causal LM) and `tok` to `path` as one GGUF file; returns the path."""
    import gguf

    if quant not in QUANTS:
        raise SftlabError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    meta = meta or GGUFMeta(name=Path(path).stem)
    cfg = model.config
    arch = arch_for(cfg)
    w = gguf.GGUFWriter(str(path), arch.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(meta.name)
    if meta.license:
        w.add_license(meta.license)
    if meta.base_repo:
        w.add_base_model_count(1)
        w.add_base_model_name(0, meta.base_repo)
        w.add_base_model_repo_url(0, f"https://huggingface.co/{meta.base_repo}")
    arch.hparams(w, cfg)
    w.add_file_type(_file_type(quant))
    if quant == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tok, int(cfg.vocab_size), meta.pre)
    _add_sampling(w, meta.generation or {})
    _add_tensors(w, model, arch, quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def read_pre(gguf_file: str | Path) -> str:
    """tokenizer.ggml.pre of an existing GGUF file ('default' when it has none)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_file)).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else "default"


def read_meta(gguf_file: str | Path, keys: tuple[str, ...]) -> dict:
    """Some general.* keys of a GGUF file, e.g. its license."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    return {k: fields[k].contents() for k in keys if k in fields}
