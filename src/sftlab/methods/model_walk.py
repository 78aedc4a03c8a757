"""A model's shape read from its modules: build the skeleton on the meta device and walk it.

The budget formulas (budget_rules.py) need, for one decoder layer, each linear layer an adapter can target
with its (in, out) features, plus the layer count, the key/value width and every base parameter. For the
Llama-family layouts budget_rules writes these down from config.json alone (no torch). Any other
layout is read here from the model itself: the Hugging Face config builds the model on the meta device
(shapes only: no weights, no memory), and the walk finds

- the language model: the whole model, or in a vision-language model the outermost module built from its text
  config (base.language_scope: language_model in LLaVA, Qwen2-VL, Gemma-3; text_model in Idefics3). Adapters
  train only it (base.scope_exclude keeps PEFT off the vision tower and the projector), so only it is counted;
- its decoder layers: the longest ModuleList of identical blocks in it;
- each layer's linears, nn.Linear or GPT-2's Conv1D (whose weight is stored (in, out)), keyed by the shortest
  dotted suffix of their path that is unique in the layer (q_proj; attn.c_proj and mlp.c_proj in GPT-2),
  as PEFT matches target_modules by suffix.

The same per-module formulas then count Qwen2's biased projections, Phi-3's fused qkv_proj and gate_up_proj,
GPT-2's Conv1D and a VLM's language model; tests/unit/test_budget_layouts.py checks each against the model
the method registry builds. What it cannot count exactly it refuses in one line: layers whose linears differ,
linears of the language model outside its layers. Building costs seconds, nearly all of it importing torch and
transformers (walking SmolLM2's 30 layers: 0.1 s): `sftlab budget` and `sftlab arena --plan` pay it only for
layouts the formulas do not know.
"""

from __future__ import annotations

from typing import Mapping

from .base import language_scope
from .budget_rules import BudgetError, ModelShape


def hf_config(cfg: Mapping):
    """The transformers config object for a config.json mapping."""
    from transformers import AutoConfig

    cfg = dict(cfg)
    kind = cfg.pop("model_type", "")
    try:
        return AutoConfig.for_model(kind, **cfg)
    except (ValueError, KeyError) as e:
        raise BudgetError(f"budget: model_type {kind!r} is not known to this transformers "
                          f"({str(e).splitlines()[0][:120]})") from None


def build_meta(cfg: Mapping):
    """The model sftlab would load for this config, built on the meta device (shapes, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    hf = hf_config(cfg)
    if hf.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = AutoModelForCausalLM
    elif hf.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto = AutoModelForImageTextToText
    else:
        raise BudgetError(f"budget: model_type {hf.model_type!r} is neither a causal language model nor an "
                          "image-text-to-text model in transformers")
    try:
        with torch.device("meta"):
            return auto.from_config(hf)
    except Exception as e:  # a modelling class's own check (a size that does not divide...): one line
        raise BudgetError(f"budget: transformers cannot build {hf.model_type} from this config "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def linear_features(module) -> tuple[int, int] | None:
    """(in, out) of a linear layer PEFT adapts (nn.Linear, transformers' Conv1D), else None."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # weight (in, out): GPT-2's fused c_attn and its projections
        return module.weight.shape[0], module.nf
    return None


def decoder_layers(model, scope: str, want: int | None) -> tuple[str, list]:
    """(path, blocks) of the language model's decoder layers: the ModuleList of `want` blocks of one class
    (the longest such list when the config does not say)."""
    import torch

    found = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.ModuleList) and len(mod) and (not scope or name.startswith(scope + "."))):
            continue
        if len({type(m) for m in mod}) == 1 and (want is None or len(mod) == want):
            found.append((len(mod), name, list(mod)))
    if not found:
        raise BudgetError(f"budget: found no list of {want or 'identical'} decoder layers in "
                          f"{scope or 'the model'}")
    _, name, blocks = max(found, key=lambda f: f[0])
    return name, blocks


def unique_keys(paths: list[str]) -> dict[str, str]:
    """path -> its shortest dotted suffix that no other path ends with (PEFT matches names by suffix)."""
    keys = {}
    for p in paths:
        parts = p.split(".")
        for k in range(1, len(parts) + 1):
            key = ".".join(parts[-k:])
            if not any(o != p and (o == key or o.endswith("." + key)) for o in paths):
                keys[p] = key
                break
    return keys


def conv1d_paths(block) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in block.named_modules() if isinstance(m, Conv1D)]


def layer_linears(blocks: list) -> list[tuple[str, int, int]]:
    """(path in the layer, in, out) of every linear of a decoder layer; the layers must agree."""
    layouts = [tuple((n, *f) for n, m in b.named_modules() if (f := linear_features(m)) is not None)
               for b in blocks]
    if any(lay != layouts[0] for lay in layouts):
        raise BudgetError("budget: the decoder layers differ in their linear layers; the solver counts "
                          "layouts whose layers are alike")
    if not layouts[0]:
        raise BudgetError("budget: the decoder layers hold no linear layer to adapt")
    return list(layouts[0])


def stray_linears(model, scope: str, layers_path: str) -> list[str]:
    """Linears of the language model outside its decoder layers (but the output head): PEFT's all-linear
    would adapt them, and the per-layer counts would miss them."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules()
            if linear_features(m) is not None and m is not head and (not scope or n.startswith(scope + "."))
            and not n.startswith(layers_path + ".")]


def module_sets(keys: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """The named module sets this layer has: its attention and its MLP (by their containers' names)."""
    def under(*words):
        return tuple(k for p, k in keys.items() if any(w in part for part in p.split(".")[:-1] for w in words))

    everything = tuple(keys.values())
    sets = {"all-linear": everything, "attention": under("attn", "attention"), "mlp": under("mlp", "feed_forward")}
    if {"q_proj", "v_proj"} <= set(everything):
        sets["qv"] = ("q_proj", "v_proj")
    return {k: v for k, v in sets.items() if v and (k == "all-linear" or set(v) != set(everything))}


def walk(cfg: Mapping) -> ModelShape:
    """The shape of any causal LM or VLM transformers can build, from its modules (see the docstring)."""
    model = build_meta(cfg)
    text = model.config.get_text_config()
    scope = language_scope(model)
    layers_path, blocks = decoder_layers(model, scope, getattr(text, "num_hidden_layers", None))
    stray = stray_linears(model, scope, layers_path)
    if stray:
        raise BudgetError(f"budget: linear layers outside the decoder layers ({', '.join(stray[:3])}) are not "
                          "counted by the solver")
    linears = layer_linears(blocks)
    keys = unique_keys([p for p, _, _ in linears])
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return ModelShape(
        model_type=model.config.model_type, hidden=hidden, layers=len(blocks), heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
        vocab=int(text.vocab_size), tied=head is not None and head.weight is embed.weight,
        intermediate=int(getattr(text, "intermediate_size", None) or 0),
        linears={keys[p]: (i, o) for p, i, o in linears}, paths={keys[p]: p for p, _, _ in linears},
        sets=module_sets(keys), conv1d=tuple(keys[p] for p in conv1d_paths(blocks[0])),
        params=tuple((n, p.numel()) for n, p in model.named_parameters()),
        text_model_type=text.model_type if scope else "", scope=scope, source="modules")
