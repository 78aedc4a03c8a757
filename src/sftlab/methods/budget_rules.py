"""What the budget solver (budget.py) counts with: the model's shape, and the pieces each method's rule is made of.

Each method carries its own BudgetRule in its registration (Method.budget: count, candidates, one-line
description), built from the helpers here: which modules and layers an options object adapts, the families of
settings a search may move, labels. The built-in rules count by per-module formulas that mirror how PEFT
shapes each method's trainable tensors (LoRA r*(in+out) per adapted linear, OFT in/b blocks, ...), applied to
the model's shape: the (in, out) of each linear of one decoder layer, the layer count, the key/value width,
every base parameter. That shape comes from one of two places (budget.model_shape picks):

- the Llama-family layouts in MODEL_TYPES (SmolLM2, Mistral, Gemma-3's text model) are written down from
  config.json alone (formula_shape: no weights, no torch, ~0.1 s for `sftlab budget`);
- any other causal LM or VLM is read from its modules (model_walk.walk: the model built on the meta device
  and walked, ~5 s, most of it importing torch and transformers): biases, fused projections (Phi-3),
  Conv1D (GPT-2), a VLM's language model (only it is counted: adapters train only it).

tests/unit/test_budget.py and test_budget_layouts.py check every formula against the model the method
registry really builds, for both kinds of shape.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import SftlabError
from ..registry import METHODS, unknown_name_message

# Each virtual token lengthens every row, so a prompt or prefix of thousands of tokens is no real setting.
MAX_VIRTUAL_TOKENS = 512

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_SETS: dict[str, tuple[str, ...]] = {
    "all-linear": LINEARS,
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj"),  # the original LoRA paper's choice
}
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
    """What the counts depend on: the language model's sizes, the linears of one decoder layer and every base
    parameter. Written down from config.json for the layouts in MODEL_TYPES (formula_shape: no torch), read from
    the modules of the model built on the meta device for any other (model_walk.walk; budget.model_shape picks)."""

    model_type: str
    hidden: int  # the language model's width (a prompt token's size)
    layers: int  # its decoder layers
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: Mapping[str, tuple[int, int]]  # key (a name PEFT matches) -> (in, out) of each linear of one layer
    paths: Mapping[str, str]  # key -> its path inside the layer (self_attn.q_proj)
    sets: Mapping[str, tuple[str, ...]]  # named module sets (all-linear, attention, mlp, qv) -> keys
    params: tuple[tuple[str, int], ...]  # (name, numel) of every base parameter, as named_parameters() names it
    intermediate: int = 0
    conv1d: tuple[str, ...] = ()  # keys of GPT-2-style Conv1D layers (LoRA and IA3 adapt them, OFT/BOFT cannot)
    text_model_type: str = ""  # a VLM's text model (llama in a LLaVA); '': the model is one
    scope: str = ""  # a VLM's language model ('model.language_model'), which adapters train; '': the whole model
    source: str = "config"  # 'config': written down from config.json; 'modules': read from the built model

    def linear(self, name: str) -> tuple[int, int]:
        return self.linears[name]

    def base_params(self) -> list[tuple[str, int]]:
        """(name, numel) of every base parameter, named as model.named_parameters() names them (tied: once)."""
        return list(self.params)

    def summary(self) -> str:
        lm = f" (language model: {self.scope})" if self.scope else ""
        mlp = f", intermediate {self.intermediate}" if self.intermediate else ""
        return (f"{self.model_type}{lm}: {self.layers} layers, hidden {self.hidden}{mlp}, heads {self.heads}/"
                f"{self.kv_heads} kv, vocab {self.vocab}{', tied' if self.tied else ''}")


def formula_shape(cfg: Mapping) -> ModelShape:
    """A Llama-family layout (MODEL_TYPES) written down from its config.json."""
    kind = cfg["model_type"]
    heads, hidden, inter = int(cfg["num_attention_heads"]), int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    linears = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
               "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    paths = {n: f"{'self_attn' if n in MODULE_SETS['attention'] else 'mlp'}.{n}" for n in linears}
    layers, vocab, tied = int(cfg["num_hidden_layers"]), int(cfg["vocab_size"]), bool(cfg.get("tie_word_embeddings"))
    bias = {"self_attn": bool(cfg.get("attention_bias")), "mlp": bool(cfg.get("mlp_bias"))}
    params = [("model.embed_tokens.weight", vocab * hidden)]
    for i in range(layers):
        for name, path in paths.items():
            n_in, n_out = linears[name]
            params.append((f"model.layers.{i}.{path}.weight", n_in * n_out))
            if bias[path.split(".")[0]]:
                params.append((f"model.layers.{i}.{path}.bias", n_out))
            if name == "o_proj" and kind in QK_NORM:
                params += [(f"model.layers.{i}.self_attn.{n}.weight", head_dim) for n in ("q_norm", "k_norm")]
        norms = LAYER_NORMS.get(kind, ("input_layernorm", "post_attention_layernorm"))
        params += [(f"model.layers.{i}.{n}.weight", hidden) for n in norms]
    params.append(("model.norm.weight", hidden))
    if not tied:  # tied: the head is the embedding, listed once
        params.append(("lm_head.weight", vocab * hidden))
    return ModelShape(kind, hidden, layers, heads, kv_heads, head_dim, vocab, tied, linears, paths,
                      dict(MODULE_SETS), tuple(params), intermediate=inter)


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

def projections(shape: ModelShape | None = None) -> tuple[str, ...]:
    """The linear layers of one decoder layer, by key (the Llama layout's seven unless the shape says)."""
    return tuple(shape.linears) if shape is not None else LINEARS


def module_sets(shape: ModelShape | None = None) -> dict[str, tuple[str, ...]]:
    """The named module sets this shape has: all-linear is its projections, the others where it has them all."""
    names = projections(shape)
    sets = shape.sets if shape is not None else MODULE_SETS
    return {"all-linear": names, **{k: v for k, v in sets.items() if k != "all-linear" and set(v) <= set(names)}}


def _matches(target: str, key: str, path: str) -> bool:
    # PEFT adapts a module whose name ends with a target; a target may also name more of the path than the
    # layer holds (model.layers.0.self_attn.q_proj: what was counted as q_proj before).
    return target in (key, path) or path.endswith("." + target) or target.endswith("." + path)


def module_names(target_modules, shape: ModelShape | None = None) -> list[str]:
    """Config target_modules -> the keys of the linears of one layer that PEFT will adapt (a name such as
    GPT-2's c_proj may match more than one)."""
    names_ = projections(shape)
    if target_modules in (["all-linear"], "all-linear"):
        return list(names_)
    paths = shape.paths if shape is not None else {n: n for n in LINEARS}
    found = {str(t): [k for k in names_ if _matches(str(t), k, paths[k])] for t in target_modules}
    unknown = [t for t, keys in found.items() if not keys]
    if unknown:
        where = f"a {shape.model_type} decoder layer" if shape is not None else "a Llama layer"
        raise BudgetError(f"budget: target_modules {unknown} are not projections of {where} "
                          f"({', '.join(names_)}, or all-linear)")
    return list(dict.fromkeys(k for keys in found.values() for k in keys))


def linear_only(shape: ModelShape, names: list[str], method: str) -> None:
    """Refuse Conv1D layers (GPT-2's c_attn...) for methods PEFT applies to nn.Linear only (OFT, BOFT)."""
    conv = [n for n in names if n in shape.conv1d]
    if conv:
        raise BudgetError(f"budget: PEFT's {method} cannot adapt Conv1D layers ({', '.join(conv)}); "
                          "name nn.Linear modules in target_modules")


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
                   explicit: bool = False, shape: ModelShape | None = None) -> list[Choice]:
    """The configured target modules first, then every other named set (unless pinned)."""
    current = module_names(configured, shape) if configured else list(default_names or [])
    first = (configured if configured else list(current), False)
    if "target_modules" in pinned:
        return [first]
    other = [(list(names) if explicit or key != "all-linear" else ["all-linear"], True)
             for key, names in module_sets(shape).items() if set(names) != set(current)]
    return [first] + other


def layer_choices(shape: ModelShape, pinned: set, configured, search: Search) -> list[Choice]:
    """The configured layers first, then subsets from the most layers to one (unless pinned)."""
    if "layers" in pinned or configured is not None:
        return [(configured, False)]
    return [(None, False)] + [(layer_subset(n, shape.layers, search.layer_pattern), True)
                              for n in range(shape.layers - 1, 0, -1)]


def tier(modules_changed: bool, layers_changed: bool) -> int:
    return 1 + int(modules_changed) + 2 * int(layers_changed)


def with_layers(mods: list[str], layers, shape: ModelShape | None = None) -> list[str]:
    """PEFT refuses layers_to_transform with the string 'all-linear': name the projections instead."""
    return list(projections(shape)) if layers is not None and mods == ["all-linear"] else mods


# ---- one-line descriptions ---------------------------------------------------------------------------

def modules_label(target_modules, default: list[str] | None = None, shape: ModelShape | None = None) -> str:
    names = set(module_names(target_modules, shape) if target_modules else default or [])
    for key, s in module_sets(shape).items():
        if names == set(s):
            return key
    return "+".join(n for n in projections(shape) if n in names)


def layers_label(shape: ModelShape, layers) -> str:
    if layers is None:
        return f"all {shape.layers} layers"
    idx = sorted(set(layers))
    shown = ",".join(map(str, idx)) if len(idx) <= 8 else ",".join(map(str, idx[:3])) + ",...," + str(idx[-1])
    return f"{len(idx)} of {shape.layers} layers ({shown})"


def describe_rotation(shape, o):
    """OFT's and BOFT's one line: block size (shared, butterfly factors), modules and layers."""
    factors = f" x {o.n_butterfly_factor} butterfly factors" if getattr(o, "n_butterfly_factor", 1) > 1 else ""
    share = " (shared)" if getattr(o, "block_share", False) else ""
    return f"block size {o.block_size}{share}{factors} on {modules_label(o.target_modules, shape=shape)}, " \
           f"{layers_label(shape, o.layers)}"


def virtual_tokens(o, pinned, search) -> list[int]:
    """The virtual-token counts a prefix or prompt search may take."""
    return knob(pinned, "num_virtual_tokens", o.num_virtual_tokens, range(1, search.max_virtual_tokens + 1))


# ---- the rule a method registers ---------------------------------------------------------------------

@dataclass(frozen=True)
class BudgetRule:
    """How to count and search one method: given as Method(..., budget=BudgetRule(...))."""

    count: Callable[[ModelShape, Any], int]  # (shape, options or a namespace of their fields) -> exact count
    candidates: Callable[[ModelShape, Any, set, Search], Iterable[Family]]  # (shape, configured, pinned, search)
    describe: Callable[[ModelShape, Any], str]  # one line, e.g. "rank 3 on all-linear, all 30 layers"
    fixed: bool = False  # full fine-tuning: nothing to solve, never refused


class Rules:
    """The budget rules of the registered methods, by method name: a read-only view of Method.budget."""

    kind = "budget rule"

    def get(self, name: str) -> BudgetRule:
        rule = METHODS.get(name).budget if name in METHODS else None
        if rule is None:
            raise BudgetError(unknown_name_message(self.kind, name, self.names()))
        return rule

    def names(self) -> list[str]:
        return [n for n in METHODS.names() if METHODS.get(n).budget is not None]

    def __contains__(self, name: object) -> bool:
        return name in METHODS and METHODS.get(name).budget is not None


RULES = Rules()
