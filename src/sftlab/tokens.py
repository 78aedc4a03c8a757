"""Functional tokens: new vocabulary entries (tool-call tags, reasoning markers, placeholders) learned by SFT.

A config's `model.new_tokens` adds tokens to the tokenizer, resizes the embedding matrices (padded to a
multiple of `model.pad_vocab_to`, tied or untied) and initialises the new rows, as a pure function of the
base weights, the token specs and the run seed, so a reload rebuilds exactly the matrix training started from.
New rows start at the mean of the existing rows (Hewitt 2021, "Initializing new word embeddings for
pretrained language models": the mean keeps the new token's logit near the average one instead of
dominating the softmax), or at the mean of the rows of a description's words, optionally plus small noise
(so tokens with the same init can part). Padding rows are zero: no token maps to them.

Which rows train:
- every adapter method (LoRA/DoRA/rsLoRA, OFT, BOFT, IA3, prefix, prompt) trains only the new rows, through
  PEFT's trainable tokens: the rows are parameters of their own (peft.utils.other.TrainableTokensWrapper around
  the embedding, and around the output head of an untied model), the matrices stay frozen and bitwise
  unchanged. LoRA gets them from its own config (`trainable_token_indices`); the other methods' PEFT configs
  have no such field, so `attach_trainable_rows` puts the same wrapper on after the method is applied.
- full fine-tuning trains every row (`model.new_token_rows: all`), or only the new ones (`new`): a gradient
  hook zeroes the old rows' gradient and the matrix leaves weight decay, so AdamW's moments of those rows stay
  exactly zero and its update is exactly zero (masking the gradient alone is not enough: decoupled weight
  decay would still shrink them).
- a token with `output: false` in an untied model keeps its output row at the init (same hook, no decay).

How they are saved (the new rows only, never a whole matrix):
- LoRA: inside the adapter (`...embed_tokens.token_adapter.trainable_tokens_delta`); plain PEFT reloads it on
  a base resized to the tokenizer.
- every other adapter method: in ADAPTER/tokens, a PEFT TrainableTokens adapter of its own beside the method's
  adapter (`split_token_adapter`; the method's adapter file holds no embedding rows). Plain reload: resize the
  base, `PeftModel.from_pretrained(base, ADAPTER/tokens).merge_and_unload()` (writes the trained rows), then
  `PeftModel.from_pretrained(that, ADAPTER)`; `merge_token_adapter` does exactly this for Run.load.

Retention stays comparable: kl_to_base compares distributions over the base's own vocabulary (probes/kl.py),
so on text without the new tokens the model at step 0 has exactly the base's distribution there (for methods
that start at the base; prefix and prompt tuning do not, but their old embedding rows stay bitwise); the mass
the model puts on new and padding rows is reported beside it.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError

TOKENIZER_DIR = "tokenizer"  # RUN/tokenizer: the tokenizer with its added tokens, written once per run
TOKEN_ADAPTER_DIR = "tokens"  # ADAPTER/tokens: the new rows of a method without trainable tokens of its own
_DELTA = "token_adapter.trainable_tokens_delta"  # a wrapper's row parameter, as PEFT names it in a saved adapter


@dataclass
class TokenPlan:
    """Where the new tokens sit, for the method and the checks."""

    ids: list[int]  # the new tokens' ids, in config order
    output_ids: list[int]  # those whose output row trains (output: true, or any token of a tied model)
    old_rows: int  # rows of the base's embedding matrix
    rows: int  # rows after resizing (padded)
    tied: bool
    embed_name: str = "embed_tokens"  # module names, as PEFT's trainable_token_indices wants them
    head_name: str = "lm_head"
    frozen: list[str] = field(default_factory=list)  # parameters with frozen rows (hooked, out of weight decay)


def add_tokens(tokenizer, specs) -> list[int]:
    """Add the tokens of `specs` (config.NewToken) to `tokenizer` in place; their ids, in order."""
    from tokenizers import AddedToken

    if not specs:
        return []
    vocab = tokenizer.get_vocab()
    taken = [s.text for s in specs if s.text in vocab]
    if taken:
        raise ModelError(f"model.new_tokens: {taken[0]!r} is already a token of this tokenizer (id "
                         f"{vocab[taken[0]]}); use it as it is, or pick a new text")
    added = [AddedToken(s.text, special=s.special, normalized=False, single_word=False) for s in specs]
    tokenizer.add_tokens(added)
    ids = tokenizer.convert_tokens_to_ids([s.text for s in specs])
    for s, i in zip(specs, ids):  # an added token must come out as one id, whatever its neighbours
        got = tokenizer(f"a{s.text}b", add_special_tokens=False)["input_ids"]
        if i not in got:
            raise ModelError(f"model.new_tokens: {s.text!r} was added but the tokenizer still splits it")
    return list(ids)


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ModelError("model.new_tokens: cannot find the embedding module by name")


def _init_rows(weight, n_real: int, specs, ids: list[int], desc_ids: list[list[int]], noise: float, gen):
    """Write the new rows of one (V, H) matrix in place; rows >= n_real that are not new become zero."""
    import torch

    real = weight[:n_real].float()  # (n_real, H)
    mean, std = real.mean(0), real.std(0)  # (H,)
    new = torch.zeros(weight.shape[0] - n_real, weight.shape[1])  # padding rows: zero
    for s, i, d in zip(specs, ids, desc_ids):
        row = real[d].mean(0) if s.init.startswith("description") else mean
        if s.init.endswith("_noise"):
            row = row + noise * std * torch.randn(weight.shape[1], generator=gen)
        new[i - n_real] = row
    weight[n_real:] = new.to(weight.dtype)


def init_new_rows(model, tokenizer, model_cfg, seed: int) -> TokenPlan | None:
    """Resize `model`'s embeddings for the tokens `add_tokens` put in `tokenizer`, initialise the new rows
    (deterministic in the base weights, the specs and `seed`); the plan, or None without new tokens."""
    import torch

    specs = model_cfg.new_tokens
    if not specs:
        return None
    ids = tokenizer.convert_tokens_to_ids([s.text for s in specs])
    old_rows = model.get_input_embeddings().weight.shape[0]
    n_real = min(ids)  # the base tokenizer's tokens; rows between them and old_rows (if any) are spare rows
    if n_real < old_rows:
        raise ModelError(f"model.new_tokens: the model has {old_rows} embedding rows but the tokenizer only "
                         f"{n_real} tokens; spare rows are not supported for new tokens (or the base already "
                         "has new tokens): start from a base without them")
    need = max(ids) + 1
    pad = model_cfg.pad_vocab_to
    rows = -(-need // pad) * pad if pad else need
    model.resize_token_embeddings(rows, mean_resizing=False)
    tied = _is_tied(model)
    desc_ids = []
    for s in specs:
        d = tokenizer(s.description, add_special_tokens=False)["input_ids"] if s.description else []
        d = [i for i in d if i < n_real]
        if s.init.startswith("description") and not d:
            raise ModelError(f"model.new_tokens: the description of {s.text!r} has no known token")
        desc_ids.append(d)
    gen = torch.Generator().manual_seed(seed)
    mats = [model.get_input_embeddings().weight] + ([] if tied else [model.get_output_embeddings().weight])
    with torch.no_grad():
        for w in mats:
            _init_rows(w.data, n_real, specs, ids, desc_ids, model_cfg.init_noise, gen)
    out_ids = [i for s, i in zip(specs, ids) if s.output or tied]
    head = model.get_output_embeddings()
    return TokenPlan(list(ids), out_ids, old_rows, rows, tied,
                     _module_name(model, model.get_input_embeddings()),
                     _module_name(model, head) if head is not None else "lm_head")


def method_kwargs(plan: TokenPlan) -> dict:
    """What an adapter method with token_rows gets: the rows that train, per module."""
    indices = {plan.embed_name: list(plan.ids)}
    if not plan.tied:  # untied: the output rows are a matrix of their own (input-only ones are frozen below)
        indices[plan.head_name] = list(plan.ids)
    return {"token_indices": indices}


def _freeze_rows(param, keep: list[int]) -> None:
    """Zero the gradient of every row of `param` but `keep`; the parameter leaves weight decay (see above)."""
    import torch

    mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)  # (rows, 1)
    mask[keep] = 1
    param.register_hook(lambda g: g * mask)
    param._sftlab_no_decay = True  # read by train.loop.build_optimizer


def freeze_rows(model, plan: TokenPlan, model_cfg, peft: bool) -> None:
    """After the method is applied: hold the rows that must not train at their values (bitwise)."""
    from .objectives import unwrap

    if peft:
        if plan.tied or plan.output_ids == plan.ids:
            return
        # PEFT's output-row parameter holds one row per new token, in plan.ids order
        keep = [k for k, i in enumerate(plan.ids) if i in plan.output_ids]
        for name, p in model.named_parameters():
            if plan.head_name in name.split(".") and "trainable_tokens_delta" in name:
                _freeze_rows(p, keep)
                plan.frozen.append(name)
        return
    base = unwrap(model)
    emb, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    if model_cfg.new_token_rows == "new" and emb.requires_grad:
        _freeze_rows(emb, plan.ids)
        plan.frozen.append("input embeddings")
    if not plan.tied and head.requires_grad and (model_cfg.new_token_rows == "new" or plan.output_ids != plan.ids):
        # "all": only the output rows of input-only new tokens stay frozen
        input_only = set(plan.ids) - set(plan.output_ids)
        keep = plan.output_ids if model_cfg.new_token_rows == "new" else \
            [i for i in range(head.shape[0]) if i not in input_only]
        _freeze_rows(head, keep)
        plan.frozen.append("output embeddings")


def save_tokenizer(run_dir: Path, tokenizer) -> Path:
    """RUN/tokenizer: the tokenizer with its added tokens (reload: AutoTokenizer.from_pretrained); a
    vision-language model's whole processor (its image processor and chat template beside the tokenizer: reload
    with AutoProcessor.from_pretrained)."""
    from .models import processor_of

    out = Path(run_dir) / TOKENIZER_DIR
    (processor_of(tokenizer) or tokenizer).save_pretrained(str(out))
    return out


# ---- adapter methods without trainable tokens of their own (all but LoRA) -------------------------------------

def attach_trainable_rows(model, indices: dict[str, list[int]]):
    """Train the rows `indices` ({module name: ids}, as `method_kwargs` gives them) of a PEFT model whose config
    has no `trainable_token_indices`: the wrapper LoRA's config would put there, so training, `freeze_rows`,
    resume and DPO's reference see the same parameters as with LoRA. Returns `model`."""
    from peft import LoraConfig
    from peft.utils.other import set_additional_trainable_modules

    name = model.active_adapter
    if getattr(model.peft_config[name], "trainable_token_indices", None):
        return model  # the method's own config carries them (LoRA)
    inner = model.get_base_model()
    # PEFT reads only the token indices (and inference_mode) from the config it is given; LoraConfig is the
    # config class that has that field, used here as the carrier.
    carrier = LoraConfig(trainable_token_indices={k: list(v) for k, v in indices.items()})
    set_additional_trainable_modules(model=inner, peft_config=carrier, model_config=inner.config.to_dict(),
                                     adapter_name=name)
    if model.peft_config[name].is_prompt_learning:
        # prompt tuning embeds the inputs itself, through the module it found when set up: the wrapper now
        model.word_embeddings = inner.get_input_embeddings()
    return model


def _wrappers(model) -> list[tuple[str, str, object]]:
    """(name in the HF model, name in `model`, wrapper) of every trainable-token wrapper that owns its rows
    (a tied head's wrapper shares the embedding's rows and is not saved)."""
    from peft.utils.other import TrainableTokensWrapper

    full = {id(m): n.replace("_fsdp_wrapped_module.", "") for n, m in model.named_modules()}
    base = model.get_base_model()
    return [(n, full[id(m)], m) for n, m in base.named_modules()
            if isinstance(m, TrainableTokensWrapper) and m.token_adapter.tied_adapter is None]


def split_token_adapter(model, folder: Path, base_location: str = "") -> bool:
    """After `model.save_pretrained(folder)`: move rows trained by `attach_trainable_rows` out of the method's
    adapter file (PEFT saves every wrapper into it, under names the method's config cannot load) into
    FOLDER/tokens, a TrainableTokens adapter plain PEFT loads. False (nothing done) for LoRA and without rows."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = model.active_adapter
    if getattr(model.peft_config[name], "trainable_token_indices", None):
        return False
    found = _wrappers(model)
    if not found:
        return False
    path = Path(folder) / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    rows, ids = {}, None
    for hf_name, full_name, m in found:
        key = f"{full_name}.{_DELTA}"
        if key not in tensors:
            raise ModelError(f"{path}: the new-token rows {key!r} were not saved; please report this")
        rows[hf_name] = tensors.pop(key)
        mine = list(m.token_adapter.token_indices[name])
        if ids is not None and mine != ids:
            raise ModelError("model.new_tokens: input and output rows differ; a TrainableTokens adapter holds one "
                             "list of rows")
        ids = mine
    save_file(tensors, str(path), metadata=meta)
    write_token_adapter(Path(folder) / TOKEN_ADAPTER_DIR, rows, ids,
                        base_location or model.peft_config[name].base_model_name_or_path or "",
                        model.get_base_model())
    return True


def write_token_adapter(folder: Path, rows: dict, ids: list[int], base_location: str = "", model=None) -> Path:
    """FOLDER as a PEFT TrainableTokens adapter: `rows` {module name in the HF model: (len(ids), H) tensor}.
    With the HF `model`, modules tied to a target (a tied output head) get its rows under their own name too,
    as PEFT saves a TrainableTokens adapter of a tied model (PEFT's loader expects that key)."""
    from peft import TrainableTokensConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrainableTokensConfig(token_indices=list(ids), target_modules=sorted(rows), task_type="CAUSAL_LM",
                                base_model_name_or_path=base_location or None, inference_mode=True)
    cfg.save_pretrained(str(folder))
    out = {n: t.detach().contiguous().cpu() for n, t in rows.items()}
    if model is not None and model.get_output_embeddings() is not None:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        en, hn = names.get(id(emb)), names.get(id(head))
        if en in out and hn not in out and _weight(head) is _weight(emb):
            out[hn] = out[en]
    save_file({f"base_model.model.{n}.trainable_tokens_delta": t.clone() for n, t in out.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def _weight(module):
    """A module's weight matrix, also through a PEFT wrapper (TrainableTokensWrapper, a tuner layer)."""
    for attr in ("original_module", "base_layer"):
        inner = getattr(module, attr, None)
        if inner is not None:
            return _weight(inner)
    return getattr(module, "weight", None)


@dataclass
class TokenRows:
    """The new rows of one matrix, before and after an adapter's TrainableTokens rows were merged in."""

    name: str  # module name in the HF model (a TrainableTokens target)
    weight: object  # the matrix (torch Parameter), holding `trained` after the merge
    ids: list[int]
    start: object  # (n, H): the rows the base had (sftlab's init)
    trained: object  # (n, H)

    def at(self, alpha: float) -> None:
        """Write start + alpha·(trained − start) into the matrix (exact at both ends)."""
        import torch

        with torch.no_grad():
            self.weight[self.ids] = torch.lerp(self.start, self.trained, float(alpha))  # exact at 0 and 1


def merge_token_adapter(model, adapter_dir: Path):
    """`model` (resized, e.g. Run.load_initial) with ADAPTER/tokens merged in, when the adapter has one:
    (model, [TokenRows]); without it (model, []). Plain PEFT, exactly the documented reload recipe."""
    from peft import PeftModel

    folder = Path(adapter_dir) / TOKEN_ADAPTER_DIR
    if not (folder / "adapter_config.json").is_file():
        return model, []
    cfg = json.loads((folder / "adapter_config.json").read_text())
    ids, names = list(cfg["token_indices"]), list(cfg["target_modules"])
    start = {n: model.get_submodule(n).weight[ids].detach().clone() for n in names}
    with warnings.catch_warnings():  # TrainableTokens does tie a tied head to the embedding's rows
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    out = []
    for n in names:
        w = merged.get_submodule(n).weight
        out.append(TokenRows(n, w, ids, start[n], w[ids].detach().clone()))
    return merged, out


@contextlib.contextmanager
def rows_at_init(model):
    """Inside the block the trainable-token wrappers are off (the matrices' own rows: the init). PEFT's
    disable_adapter does this for LoRA-style tuners, not for prompt learning; nested in it, it is a no-op there."""
    from peft.utils.other import TrainableTokensWrapper

    ws = [m for m in model.modules() if isinstance(m, TrainableTokensWrapper)]
    was = [m.disable_adapters for m in ws]
    for m in ws:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, off in zip(ws, was):
            m.enable_adapters(not off)
