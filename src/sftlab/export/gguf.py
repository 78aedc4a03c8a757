"""A merged Hugging Face causal LM + its tokenizer -> one GGUF file, as llama.cpp's convert_hf_to_gguf.py writes it.

What llama.cpp (and Ollama, and transformers' `gguf_file=` loader) expect of a Llama file:
- tensor names from gguf's own name map (`token_embd.weight`, `blk.N.attn_q.weight`, ...); no `output.weight`
  when the head is tied to the embeddings (the loader reads its absence as tie_word_embeddings);
- Q and K rows permuted per head from HF's rotate-half layout to llama.cpp's interleaved one (the loader's
  LlamaTensorProcessor undoes exactly this permute);
- 1-D tensors (norms) kept f32 whatever the quantization, as convert_hf_to_gguf does;
- a byte-level BPE tokenizer as `gpt2`: tokens in id order, token types (special added tokens are CONTROL),
  merges, bos/eos/unk/pad ids, add_bos, and the chat template; generation defaults as `general.sampling.*`;
- a SentencePiece-style one (BPE with byte fallback, Gemma's) as `llama`: tokens, scores and types (copied from
  the GGUF the base came from when the vocabulary is the same; else rebuilt, scored by id), no merges.

Gemma-3 (Gemma3ForCausalLM, model_type gemma3_text -> general.architecture gemma3), as convert_hf_to_gguf's
Gemma3Model writes it: the same key set as the official Gemma-3-270M GGUF (context/embedding/block/ffn lengths,
head counts, key/value length = head_dim, rope.freq_base of the full-attention layers, sliding_window, rms eps);
no Q/K permute (llama.cpp runs Gemma's rotary in the NEOX layout); every `*norm.weight` stored as `w + 1`
(Gemma scales by 1 + w, llama.cpp by w; transformers' loader subtracts 1 again). What the format does not state,
llama.cpp assumes (every 6th layer full attention, the rest sliding; sliding layers' rope base 10000; queries
scaled by 1/sqrt(head_dim); no soft-capping): a model that differs is refused rather than written wrong.

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


def _rope_of(cfg, layer_type: str) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    sub = params.get(layer_type) if isinstance(params, dict) else None
    return sub if isinstance(sub, dict) else {}


def _gemma3_check(cfg) -> None:
    """Refuse what a gemma3 GGUF cannot state and llama.cpp would silently read differently."""
    def refuse(what: str) -> None:
        raise SftlabError(f"GGUF export: this Gemma-3 has {what}, which a gemma3 GGUF cannot state (llama.cpp "
                          "assumes the Gemma-3 defaults); export a merged folder (--format hf) instead")

    n = int(cfg.num_hidden_layers)
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if list(getattr(cfg, "layer_types", None) or pattern) != pattern:
        refuse(f"layer types {list(cfg.layer_types)} (llama.cpp: every 6th layer full attention)")
    if int(getattr(cfg, "query_pre_attn_scalar", None) or _head_dim(cfg)) != _head_dim(cfg):
        refuse(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} != head_dim {_head_dim(cfg)}")
    local = _rope_of(cfg, "sliding_attention")
    if float(local.get("rope_theta", 10000.0)) != 10000.0 or local.get("rope_type", "default") != "default":
        refuse(f"sliding-layer rope {local}")
    full = _rope_of(cfg, "full_attention")
    if full.get("rope_type", "default") not in ("default", "linear"):
        refuse(f"rope scaling {full.get('rope_type')!r} (only linear is stated)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, key, None) is not None:
            refuse(f"{key} {getattr(cfg, key)}")
    if getattr(cfg, "use_bidirectional_attention", False) or getattr(cfg, "attention_bias", False):
        refuse("bidirectional attention or attention biases")
    if getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        refuse(f"activation {cfg.hidden_activation!r}")


def _gemma3_hparams(w, cfg) -> None:
    import gguf

    full = _rope_of(cfg, "full_attention")
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_key_length(_head_dim(cfg))
    w.add_value_length(_head_dim(cfg))
    w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))  # the full-attention layers'
    w.add_sliding_window(int(cfg.sliding_window))
    w.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
    if full.get("rope_type") == "linear":  # Gemma-3 1B+: scaling on the full-attention layers only
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))


def _gemma3_tensor(name: str, data, cfg):
    return data + 1.0 if name.endswith("norm.weight") else data  # Gemma's 1 + w, as llama.cpp multiplies


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", _llama_check, _llama_hparams, _llama_tensor),
    "gemma3_text": GGUFArch("gemma3", _gemma3_check, _gemma3_hparams, _gemma3_tensor),
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

def _is_byte_level(spec: dict) -> bool:
    """A gpt2-style vocabulary (bytes spelled as printable characters), not a SentencePiece one (▁ + byte fallback)."""
    return spec["model"].get("type") == "BPE" and "ByteLevel" in json.dumps(
        [spec.get("pre_tokenizer"), spec.get("decoder")])


def _token_types(tok, spec: dict, vocab_size: int, by_id: dict, spm: bool) -> list:
    from gguf import TokenType

    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    types = []
    for i in range(vocab_size):
        if i not in by_id:
            types.append(TokenType.UNUSED)
        elif spm and len(by_id[i]) == 6 and by_id[i].startswith("<0x") and by_id[i].endswith(">"):
            types.append(TokenType.BYTE)  # byte fallback: llama.cpp decodes these to raw bytes
        elif i in added:  # special ones CONTROL (Google's Gemma file types <unk> so too), others USER_DEFINED
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif spm and i == getattr(tok, "unk_token_id", None):
            types.append(TokenType.UNKNOWN)
        else:
            types.append(TokenType.NORMAL)
    return types


def _spm_tokens(w, tok, spec: dict, vocab_size: int, by_id: dict, source: str) -> None:
    """tokenizer.ggml.model `llama` (SentencePiece): tokens, scores, types. When the base came from a GGUF file
    with this very vocabulary (Gemma-3-270M does), its three arrays are copied verbatim: they are what llama.cpp
    was given by Google's own converter; otherwise they are rebuilt from the HF tokenizer, scored by id (earlier
    = merged first, the order transformers' reader recovers Gemma merges from)."""
    if source and Path(source).is_file():
        from gguf import GGUFReader

        fields = GGUFReader(str(source)).fields
        tokens = fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in fields else []
        if len(tokens) == vocab_size and len(by_id) <= vocab_size and fields.get("tokenizer.ggml.model") \
                and fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.scores" in fields:
            w.add_token_list(tokens)
            w.add_token_scores([float(x) for x in fields["tokenizer.ggml.scores"].contents()])
            w.add_token_types([int(x) for x in fields["tokenizer.ggml.token_type"].contents()])
            return
    w.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    w.add_token_scores([-float(i) for i in range(vocab_size)])
    w.add_token_types(_token_types(tok, spec, vocab_size, by_id, spm=True))


def _adds_bos(tok) -> bool:
    """Whether encoding puts BOS in front: the flag, or a post-processor that does it (Gemma's converted
    tokenizer keeps add_bos_token False and adds BOS in its template)."""
    if getattr(tok, "add_bos_token", False):
        return True
    bos = getattr(tok, "bos_token_id", None)
    return bos is not None and tok("a").input_ids[:1] == [bos]


def _add_tokenizer(w, tok, vocab_size: int, pre: str, source: str = "") -> None:
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE":
        raise SftlabError(f"GGUF export: a {spec['model'].get('type')} tokenizer is not translated yet (only "
                          "BPE: byte-level, the gpt2 kind, or SentencePiece-style with byte fallback)")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise SftlabError(f"GGUF export: the tokenizer has ids up to {max(by_id)} but the model's embedding has "
                          f"{vocab_size} rows")
    if _is_byte_level(spec):
        # rows beyond the tokenizer (padding) get placeholder tokens, as llama.cpp does
        merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"].get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
        w.add_token_types(_token_types(tok, spec, vocab_size, by_id, spm=False))
        w.add_token_merges(merges)
    else:
        if not spec["model"].get("byte_fallback"):
            raise SftlabError("GGUF export: a BPE tokenizer that is neither byte-level nor SentencePiece-style "
                              "(byte fallback) is not translated yet")
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre(pre)
        _spm_tokens(w, tok, spec, vocab_size, by_id, source)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        if getattr(tok, key, None) is not None:
            add(int(getattr(tok, key)))
    w.add_add_bos_token(_adds_bos(tok))
    if not _is_byte_level(spec):
        w.add_add_sep_token(False)
        w.add_add_eos_token(bool(getattr(tok, "add_eos_token", False)))
        w.add_add_space_prefix(False)  # Gemma's normalizer only replaces spaces by ▁; it prepends none
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
    source: str = ""  # the GGUF file the base was converted from, if any (its SentencePiece arrays are reused)


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
    _add_tokenizer(w, tok, int(cfg.vocab_size), meta.pre, meta.source)
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
