"""Exact trainable-parameter counts per method, and the knobs the budget solver may move (see budget.py).

Counts come from the model config alone (no weights, no torch), by formulas that mirror how PEFT 0.21
shapes each method's trainable tensors; tests/unit/test_budget.py checks every formula against the
model the method registry really builds. One BudgetRule per registered method: count, candidates,
one-line description.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import SftlabError
from ..registry import Registry

# Each virtual token lengthens every row, so a prompt or prefix of thousands of tokens is no real setting.
MAX_VIRTUAL_TOKENS = 512

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_SETS: dict[str, tuple[str, ...]] = {
    "all-linear": LINEARS,
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj"),  # the original LoRA paper's choice
}
# PEFT's IA3 defaults for the Llama family (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING): targets, feed-forward.
IA3_DEFAULT = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
IA3_DEFAULTS = {"gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"])}  # where PEFT's differ
# The decoder layouts these formulas know (and the tests verify). Gemma-3's text decoder has the same seven
# projections and adds RMSNorms: one on the queries and one on the keys (head_dim each, after the projection),
# and a second pair around the MLP (pre/post feed-forward); its embedding is scaled by sqrt(hidden) at run time
# (no parameter), and its head is tied.
MODEL_TYPES = ("llama", "mistral", "gemma3_text")
LAYER_NORMS = {"gemma3_text": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                               "post_feedforward_layernorm")}
QK_NORM = ("gemma3_text",)


class BudgetError(SftlabError):
    """No setting of the method comes close enough to the budget, or the model or options are unsupported."""


# ---- the model's shape -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the counts depend on, read from a Hugging Face config (Llama-family decoder)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping) -> "ModelShape":
        kind = cfg.get("model_type", "")
        if kind not in MODEL_TYPES:
            raise BudgetError(f"budget: model_type {kind!r} is not supported; the solver knows the Llama layout "
                              f"({', '.join(MODEL_TYPES)})")
        heads = int(cfg["num_attention_heads"])
        return cls(kind, int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]),
                   heads, int(cfg.get("num_key_value_heads") or heads),
                   int(cfg.get("head_dim") or cfg["hidden_size"] // heads), int(cfg["vocab_size"]),
                   bool(cfg.get("tie_word_embeddings", False)), bool(cfg.get("attention_bias", False)),
                   bool(cfg.get("mlp_bias", False)))

    @cached_property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    def linear(self, name: str) -> tuple[int, int]:
        return self.linears[name]

    def base_params(self) -> list[tuple[str, int]]:
        """(name, numel) of every base parameter, named as model.named_parameters() names them."""
        out = [("model.embed_tokens.weight", self.vocab * self.hidden)]
        for i in range(self.layers):
            for name in LINEARS:
                n_in, n_out = self.linear(name)
                part = "self_attn" if name in MODULE_SETS["attention"] else "mlp"
                out.append((f"model.layers.{i}.{part}.{name}.weight", n_in * n_out))
                if self.attention_bias if part == "self_attn" else self.mlp_bias:
                    out.append((f"model.layers.{i}.{part}.{name}.bias", n_out))
                if name == "o_proj" and self.model_type in QK_NORM:
                    out += [(f"model.layers.{i}.self_attn.{n}.weight", self.head_dim) for n in ("q_norm", "k_norm")]
            norms = LAYER_NORMS.get(self.model_type, ("input_layernorm", "post_attention_layernorm"))
            out += [(f"model.layers.{i}.{n}.weight", self.hidden) for n in norms]
        out.append(("model.norm.weight", self.hidden))
        if not self.tied:  # tied: the head is the embedding, listed once
            out.append(("lm_head.weight", self.vocab * self.hidden))
        return out

    def summary(self) -> str:
        return (f"{self.model_type}: {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"heads {self.heads}/{self.kv_heads} kv, vocab {self.vocab}{', tied' if self.tied else ''}")


def read_config(model: str | Path | Mapping) -> dict:
    """A model's config.json as a dict: from a mapping, a folder, or anything resolve_model accepts."""
    if isinstance(model, Mapping):
        return dict(model)
    from ..models import resolve_model

    ref = resolve_model(str(model), content_hash=False)
    path = Path(ref.location) / "config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from transformers import AutoConfig  # a hub id: its config only (no weights)

    try:
        return AutoConfig.from_pretrained(ref.location).to_dict()
    except OSError as e:
        raise BudgetError(f"budget: cannot read the config of {model} ({str(e).splitlines()[0]})") from None


# ---- which modules and layers an options object adapts -----------------------------------------------

def module_names(target_modules) -> list[str]:
    """Config target_modules -> the projection names of one layer that PEFT will adapt."""
    if target_modules in (["all-linear"], "all-linear"):
        return list(LINEARS)
    names = [str(t).rsplit(".", 1)[-1] for t in target_modules]
    unknown = [t for t, n in zip(target_modules, names) if n not in LINEARS]
    if unknown:
        raise BudgetError(f"budget: target_modules {unknown} are not projections of a Llama layer "
                          f"({', '.join(LINEARS)}, or all-linear)")
    return list(dict.fromkeys(names))


def layer_count(shape: ModelShape, layers: list[int] | None) -> int:
    if layers is None:
        return shape.layers
    bad = [i for i in layers if not 0 <= i < shape.layers]
    if bad or not layers:
        raise BudgetError(f"budget: layers {layers} must be a non-empty list of indices in 0..{shape.layers - 1}")
    return len(set(layers))


def layer_subset(n: int, total: int, pattern: str) -> list[int]:
    """n of `total` layer indices: 'spread' (centres of n equal bands of depth), 'first' or 'last'."""
    if pattern == "first":
        return list(range(n))
    if pattern == "last":
        return list(range(total - n, total))
    if pattern == "spread":
        return sorted({int((i + 0.5) * total / n) for i in range(n)})
    raise BudgetError(f"budget: layer pattern {pattern!r} is not one of spread, first, last")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- exact counts per method (options: the method's own options dataclass) ---------------------------

def count_full(shape: ModelShape, o) -> int:
    return sum(n for name, n in shape.base_params() if not any(s in name for s in o.freeze))


def count_lora(shape: ModelShape, o) -> int:
    # A (r x in) and B (out x r) per module; DoRA adds a magnitude vector of length out.
    per_layer = 0
    for name in module_names(o.target_modules):
        n_in, n_out = shape.linear(name)
        per_layer += o.r * (n_in + n_out) + (n_out if o.use_dora else 0)
    return per_layer * layer_count(shape, o.layers)


def check_block(shape: ModelShape, names: list[str], b: int) -> None:
    # PEFT's OFT silently changes a block size that does not divide a layer's input; refuse it instead.
    for name in names:
        n_in = shape.linear(name)[0]
        if n_in % b:
            raise BudgetError(f"budget: block_size {b} does not divide {name}'s {n_in} inputs")


def count_oft(shape: ModelShape, o) -> int:
    # in/b blocks per module, each a skew-symmetric b x b generator stored as its b(b-1)/2 free entries.
    names = module_names(o.target_modules)
    check_block(shape, names, o.block_size)
    tri = o.block_size * (o.block_size - 1) // 2
    per_layer = sum((1 if o.block_share else shape.linear(n)[0] // o.block_size) * tri for n in names)
    return per_layer * layer_count(shape, o.layers)


def boft_fits(n_in: int, b: int, m: int) -> bool:
    """PEFT's BOFT constraints for m butterfly factors: 2^(m-1) blocks per butterfly, even blocks then."""
    if n_in % b:
        return False
    return m == 1 or (b % 2 == 0 and (n_in // b) % 2 == 0 and n_in % (b * 2 ** (m - 1)) == 0)


def count_boft(shape: ModelShape, o) -> int:
    # m factors of in/b full b x b blocks (boft_R) plus an output scale vector (boft_s) per module.
    per_layer = 0
    for name in module_names(o.target_modules):
        n_in, n_out = shape.linear(name)
        if not boft_fits(n_in, o.block_size, o.n_butterfly_factor):
            raise BudgetError(f"budget: block_size {o.block_size} with {o.n_butterfly_factor} butterfly factor(s) "
                              f"does not fit {name}'s {n_in} inputs")
        per_layer += o.n_butterfly_factor * n_in * o.block_size + n_out
    return per_layer * layer_count(shape, o.layers)


def prefix_width(shape: ModelShape) -> int:
    # PEFT sizes each layer's key (and value) prefix to the KV heads (grouped-query attention, peft#1901).
    return shape.kv_heads * shape.head_dim


def count_prefix(shape: ModelShape, o) -> int:
    d, out = prefix_width(shape), 2 * shape.layers * prefix_width(shape)  # keys and values at every layer
    if not o.projection:
        return o.num_virtual_tokens * out
    h = o.encoder_hidden_size  # embedding (tokens x d) -> Linear(d, h) -> tanh -> Linear(h, out)
    return o.num_virtual_tokens * d + (d * h + h) + (h * out + out)


def count_prompt(shape: ModelShape, o) -> int:
    return o.num_virtual_tokens * shape.hidden


def ia3_default(shape: ModelShape) -> tuple[list[str], list[str]]:
    return IA3_DEFAULTS.get(shape.model_type, IA3_DEFAULT)


def ia3_modules(o, shape: ModelShape | None = None) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets) as PEFT will resolve them (its defaults for the architecture when unset)."""
    default = ia3_default(shape) if shape is not None else IA3_DEFAULT
    targets = module_names(o.target_modules) if o.target_modules else default[0]
    ff = module_names(o.feedforward_modules) if o.feedforward_modules else default[1]
    return targets, ff


def count_ia3(shape: ModelShape, o) -> int:
    # One vector per module: over the input for feed-forward modules, over the output otherwise.
    targets, ff = ia3_modules(o, shape)
    per_layer = sum(shape.linear(n)[0 if n in ff else 1] for n in targets)
    return per_layer * layer_count(shape, o.layers)


# ---- the knobs each method's search may move ---------------------------------------------------------

@dataclass(frozen=True)
class Search:
    layer_pattern: str = "spread"  # which layers a subset of n takes (see layer_subset)
    max_virtual_tokens: int = MAX_VIRTUAL_TOKENS


Choice = tuple[Any, bool]  # (value, whether it departs from the method as configured)


@dataclass(frozen=True)
class Family:
    """Settings that share every knob but one, `key`, whose `values` are sorted so that the count rises
    with them (rank, block size, virtual tokens): the solver bisects instead of counting each one."""

    tier: int  # 1: main knob only; 2: other target modules; 3: a layer subset; 4: both
    fixed: dict
    key: str | None = None  # None: a single setting
    values: list = dataclasses.field(default_factory=lambda: [None])

    def knobs(self, i: int) -> dict:
        return {self.key: self.values[i], **self.fixed} if self.key else dict(self.fixed)


def knob(pinned: set, key: str, configured, values: Iterable) -> list:
    return [configured] if key in pinned else list(values)


def module_choices(pinned: set, configured, default_names: list[str] | None = None,
                   explicit: bool = False) -> list[Choice]:
    """The configured target modules first, then every other named set (unless pinned)."""
    current = module_names(configured) if configured else list(default_names or [])
    first = (configured if configured else list(current), False)
    if "target_modules" in pinned:
        return [first]
    other = [(list(names) if explicit or key != "all-linear" else ["all-linear"], True)
             for key, names in MODULE_SETS.items() if set(names) != set(current)]
    return [first] + other


def layer_choices(shape: ModelShape, pinned: set, configured, search: Search) -> list[Choice]:
    """The configured layers first, then subsets from the most layers to one (unless pinned)."""
    if "layers" in pinned or configured is not None:
        return [(configured, False)]
    return [(None, False)] + [(layer_subset(n, shape.layers, search.layer_pattern), True)
                              for n in range(shape.layers - 1, 0, -1)]


def tier(modules_changed: bool, layers_changed: bool) -> int:
    return 1 + int(modules_changed) + 2 * int(layers_changed)


def with_layers(mods: list[str], layers) -> list[str]:
    """PEFT refuses layers_to_transform with the string 'all-linear': name the projections instead."""
    return list(LINEARS) if layers is not None and mods == ["all-linear"] else mods


def lora_candidates(shape, o, pinned, search):
    for mods, m_changed in module_choices(pinned, o.target_modules):
        # A rank above a module's smaller side adds parameters without adding rank.
        r_max = min(min(shape.linear(n)) for n in module_names(mods))
        for layers, l_changed in layer_choices(shape, pinned, o.layers, search):
            fixed = {"target_modules": with_layers(mods, layers), "layers": layers}
            yield Family(tier(m_changed, l_changed), fixed, "r", knob(pinned, "r", o.r, range(1, r_max + 1)))


def oft_candidates(shape, o, pinned, search):
    for mods, m_changed in module_choices(pinned, o.target_modules):
        ins = [shape.linear(n)[0] for n in module_names(mods)]
        sizes = [b for b in divisors(min(ins)) if b >= 2 and all(i % b == 0 for i in ins)]
        for layers, l_changed in layer_choices(shape, pinned, o.layers, search):
            fixed = {"target_modules": with_layers(mods, layers), "layers": layers}
            yield Family(tier(m_changed, l_changed), fixed, "block_size",
                         knob(pinned, "block_size", o.block_size, sizes))


def boft_candidates(shape, o, pinned, search):
    # More than one butterfly factor needs PEFT's CUDA kernel (see boft.py): searched only when it is on.
    factors = knob(pinned, "n_butterfly_factor", o.n_butterfly_factor,
                   range(1, 5) if o.cuda_kernel else [o.n_butterfly_factor])
    for mods, m_changed in module_choices(pinned, o.target_modules):
        ins = [shape.linear(n)[0] for n in module_names(mods)]
        for layers, l_changed in layer_choices(shape, pinned, o.layers, search):
            for m in factors:
                sizes = [b for b in divisors(min(ins)) if b >= 2 and all(boft_fits(i, b, m) for i in ins)]
                fixed = {"target_modules": with_layers(mods, layers), "layers": layers}
                if m != 1 or "n_butterfly_factor" in pinned:
                    fixed["n_butterfly_factor"] = m
                yield Family(tier(m_changed, l_changed), fixed, "block_size",
                             knob(pinned, "block_size", o.block_size, sizes))


def ia3_candidates(shape, o, pinned, search):
    for mods, m_changed in module_choices(pinned, o.target_modules, ia3_default(shape)[0], explicit=True):
        # IA3 scales the MLP's inner activation (the down projection's input), as in Liu et al. 2022.
        ff = o.feedforward_modules if "feedforward_modules" in pinned else (
            ["down_proj"] if "down_proj" in module_names(mods) else None)
        for layers, l_changed in layer_choices(shape, pinned, o.layers, search):
            yield Family(tier(m_changed, l_changed), {"target_modules": mods, "feedforward_modules": ff,
                                                      "layers": layers})


def virtual_tokens(o, pinned, search) -> list[int]:
    return knob(pinned, "num_virtual_tokens", o.num_virtual_tokens, range(1, search.max_virtual_tokens + 1))


def prefix_candidates(shape, o, pinned, search):
    if not o.projection:
        yield Family(1, {}, "num_virtual_tokens", virtual_tokens(o, pinned, search))
        return
    widths = knob(pinned, "encoder_hidden_size", o.encoder_hidden_size,
                  sorted({2 ** k for k in range(3, 13)} | set(range(64, 2049, 64))))
    for h in widths:
        yield Family(1, {"encoder_hidden_size": h}, "num_virtual_tokens", virtual_tokens(o, pinned, search))


def prompt_candidates(shape, o, pinned, search):
    yield Family(1, {}, "num_virtual_tokens", virtual_tokens(o, pinned, search))


def full_candidates(shape, o, pinned, search):
    yield Family(1, {})


# ---- one-line descriptions ---------------------------------------------------------------------------

def modules_label(target_modules, default: list[str] | None = None) -> str:
    names = set(module_names(target_modules) if target_modules else default or [])
    for key, s in MODULE_SETS.items():
        if names == set(s):
            return key
    return "+".join(n for n in LINEARS if n in names)


def layers_label(shape: ModelShape, layers) -> str:
    if layers is None:
        return f"all {shape.layers} layers"
    idx = sorted(set(layers))
    shown = ",".join(map(str, idx)) if len(idx) <= 8 else ",".join(map(str, idx[:3])) + ",...," + str(idx[-1])
    return f"{len(idx)} of {shape.layers} layers ({shown})"


def describe_lora(shape, o):
    return f"rank {o.r}{' DoRA' if o.use_dora else ''} on {modules_label(o.target_modules)}, " \
           f"{layers_label(shape, o.layers)}"


def describe_rotation(shape, o):
    factors = f" x {o.n_butterfly_factor} butterfly factors" if getattr(o, "n_butterfly_factor", 1) > 1 else ""
    share = " (shared)" if getattr(o, "block_share", False) else ""
    return f"block size {o.block_size}{share}{factors} on {modules_label(o.target_modules)}, " \
           f"{layers_label(shape, o.layers)}"


def describe_ia3(shape, o):
    targets, ff = ia3_modules(o, shape)
    return f"vectors on {modules_label(targets)} (input side: {'+'.join(ff) or 'none'}), " \
           f"{layers_label(shape, o.layers)}"


def describe_prefix(shape, o):
    how = f", through an MLP of width {o.encoder_hidden_size}" if o.projection else ""
    return f"{o.num_virtual_tokens} virtual tokens of keys and values at all {shape.layers} layers{how}"


def describe_prompt(shape, o):
    return f"{o.num_virtual_tokens} virtual input tokens"


def describe_full(shape, o):
    frozen = f", frozen: {', '.join(o.freeze)}" if o.freeze else ""
    return f"every weight (the reference; its count is fixed){frozen}"


@dataclass(frozen=True)
class BudgetRule:
    """How to count and search one registered method."""

    method: str
    count: Callable[[ModelShape, Any], int]
    candidates: Callable[[ModelShape, Any, set, Search], Iterable[Family]]  # (shape, configured, pinned, search)
    describe: Callable[[ModelShape, Any], str]
    fixed: bool = False  # full fine-tuning: nothing to solve, never refused


RULES: Registry[BudgetRule] = Registry("budget rule")
for _rule in (BudgetRule("full", count_full, full_candidates, describe_full, fixed=True),
              BudgetRule("lora", count_lora, lora_candidates, describe_lora),
              BudgetRule("oft", count_oft, oft_candidates, describe_rotation),
              BudgetRule("boft", count_boft, boft_candidates, describe_rotation),
              BudgetRule("ia3", count_ia3, ia3_candidates, describe_ia3),
              BudgetRule("prefix", count_prefix, prefix_candidates, describe_prefix),
              BudgetRule("prompt", count_prompt, prompt_candidates, describe_prompt)):
    RULES.register(_rule.method, _rule)
ALIASES = {"dora": ("lora", {"use_dora": True})}  # a method name -> (registered method, options it implies)
