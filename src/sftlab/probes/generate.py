"""generate: greedy generation scored against references - exact match, normalised match, macro-F1, ROUGE-L.

Rows hold a prompt (`prompt`, or `messages`) and a reference (`completion` / `answer` / `reference` /
`output` / `label`, or the final assistant turn of `messages`). Generation is greedy (no sampling, one
beam), batched with left padding over prompts sorted by length, so the same model, data and batch size
give the same text every time. A few generations are kept in `extra['samples']` for people to read.

Not cheap: run on the base, the final checkpoint and the frontier points, or everywhere when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..configtools import check, doc
from .base import BaseProbe, ProbeContext, bootstrap_ci, register_probe, subset
from .metrics import exact_match, macro_f1, normalise_text, normalised_match, rouge_l

METRICS = ("exact_match", "normalised", "macro_f1", "rouge_l")


@dataclass
class GenerateOptions:
    path: str = doc("rows with 'prompt' (or 'messages') and a reference answer", default="")
    metric: Literal["exact_match", "normalised", "macro_f1", "rouge_l"] = doc(
        "the score's value (all four are reported): exact match, match ignoring case/whitespace/punctuation, "
        "macro-F1 over the label set, ROUGE-L F1", default="normalised")
    labels: list[str] = doc("label set for macro-F1 (empty: the distinct references)", default_factory=list)
    max_new_tokens: int = doc("generation budget per prompt", default=32)
    samples: int = doc("generations kept in the score for people to read", default=4)
    kind: Literal["task", "retention"] = doc("what the generations measure", default="task")
    limit: int = doc("score a fixed seeded subset of this many rows (0: all)", default=0)
    template: Literal["auto", "chat", "raw"] = doc("how prompts are rendered, as data.template", default="auto")
    score_name: str = doc("name of the score in trajectory.jsonl (default: generate)", default="")

    def __post_init__(self):
        check(bool(self.path), "path", "generate needs the data file to score")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.limit >= 0 and self.samples >= 0, "limit", "limit and samples must be >= 0")


def encode_prompts(tokenizer, prompts: list[str], add_special_tokens: bool, images=None, places=None):
    """Token ids of each rendered prompt, and the per-token inputs a vision-language processor adds (Qwen2-VL's
    mm_token_type_ids): a row with images gets its images' tokens from the processor, as in training."""
    from ..models import processor_of

    proc = processor_of(tokenizer)
    if proc is None or not any(images or ()):
        return [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts], [{}] * len(prompts)
    from ..config_vision import DEFAULT_MAX_PIXELS
    from ..data.images import open_image
    from ..data.multimodal import processor_ids

    max_pixels = getattr(proc, "sftlab_max_pixels", DEFAULT_MAX_PIXELS)
    ids, extra = [], []
    for k, (p, refs) in enumerate(zip(prompts, images)):
        place = places[k] if places else f"prompt {k}"
        i, e = processor_ids(proc, p, [open_image(r, place, j, max_pixels) for j, r in enumerate(refs)])
        ids.append(i)
        extra.append(e)
    return ids, extra


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device,
                    add_special_tokens: bool = False, skip_special_tokens: bool = True, images=None,
                    places=None) -> list[str]:
    """Greedy continuations of `prompts` (decoded, special tokens dropped unless asked, stripped), in input order.
    `images`: each prompt's images (data.images.ImageRef) on a vision-language run, batched as in training."""
    import torch
    from transformers import GenerationConfig

    from .likelihood import length_batches, pad_id, scoring, vision_maker

    enc_all, extra = encode_prompts(tokenizer, prompts, add_special_tokens, images, places)
    vision = vision_maker(tokenizer) if any(images or ()) else None
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(getattr(model, "generation_config", None),
                                                          "eos_token_id", None)))
    eos.discard(None)
    pad = pad_id(tokenizer)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                               eos_token_id=sorted(eos) or None)
    out: list[str] = [""] * len(prompts)
    with scoring(model):
        for idx in length_batches(enc_all, batch_size, length=len):
            L = max(len(enc_all[i]) for i in idx)
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            per_token = {k: torch.zeros((len(idx), L), dtype=torch.long) for i in idx for k in extra[i]}
            for r, i in enumerate(idx):  # left padding: every row's last prompt token is at position L-1
                n = len(enc_all[i])
                ids[r, L - n:] = torch.tensor(enc_all[i])
                mask[r, L - n:] = 1
                for k, v in extra[i].items():
                    per_token[k][r, L - n:] = torch.tensor(v)
            kw = {}
            if vision is not None:  # the batch's image tensors, as training makes them
                kw = vision([images[i] for i in idx], [places[i] if places else f"prompt {i}" for i in idx])
                kw = {**kw, **per_token} if kw else {}
            kw = {k: v.to(device) for k, v in kw.items()}
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                                 **kw)
            for r, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[r, L:], skip_special_tokens=skip_special_tokens).strip()
    return out


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def load_prompts(path: str, what: str, limit: int, seed: int, template: str, tokenizer, need_reference: bool,
                 with_images: bool = False):
    """(rendered prompts, references or None, places) of a fixed subset of the file's rows; with_images: and each
    row's images (data.images.ImageRef; rows without images are refused otherwise, as a text model would)."""
    from pathlib import Path

    from .texts import prompt_and_images, prompt_messages, read_rows, reference, render_prompt

    rows = read_rows(path, what)
    rows = [rows[i] for i in subset(len(rows), limit, seed)]
    if with_images:
        read = [prompt_and_images(row, place, Path(path).expanduser().parent) for place, row in rows]
    else:
        read = [(prompt_messages(row, place), []) for place, row in rows]
    prompts = [render_prompt(tokenizer, msgs, template) for msgs, _ in read]
    refs = [reference(row, place) for place, row in rows] if need_reference else None
    if with_images:
        return prompts, refs, [place for place, _ in rows], [r for _, r in read]
    return prompts, refs, [place for place, _ in rows]


def generation_metrics(preds: list[str], refs: list[str], labels: list[str]) -> dict[str, list[float] | float]:
    """Per-example exact / normalised / ROUGE-L values, and macro-F1 over the (normalised) label set."""
    label_set = [normalise_text(x) for x in labels] if labels else sorted({normalise_text(r) for r in refs})
    f1, _ = macro_f1([normalise_text(r) for r in refs], [normalise_text(p) for p in preds], label_set)
    return {"exact_match": [float(exact_match(p, r)) for p, r in zip(preds, refs)],
            "normalised": [float(normalised_match(p, r)) for p, r in zip(preds, refs)],
            "rouge_l": [rouge_l(p, r) for p, r in zip(preds, refs)], "macro_f1": f1, "label_set": label_set}


class Generate(BaseProbe):
    registered = "generate"
    higher_is_better = True
    cheap = False

    def score(self, model, tokenizer, ctx: ProbeContext):
        import numpy as np

        from ..data.tokenize import use_chat_template
        from ..errors import DataError
        from ..models import processor_of

        o = self.options
        prompts, refs, places, images = load_prompts(o.path, "path", o.limit, ctx.seed, o.template, tokenizer,
                                                     need_reference=True, with_images=True)
        if any(images) and processor_of(tokenizer) is None:
            raise DataError(f"{places[[bool(i) for i in images].index(True)]}: this row has images but the model is "
                            "a text-only model; score image rows on a vision-language model's run, or remove them")
        raw = not use_chat_template(tokenizer, o.template) and processor_of(tokenizer) is None
        preds = greedy_generate(model, tokenizer, prompts, o.max_new_tokens, ctx.batch_size,
                                ctx.resolve_device(model), add_special_tokens=raw, images=images, places=places)
        m = generation_metrics(preds, refs, o.labels)
        means = {k: float(np.mean(m[k])) for k in ("exact_match", "normalised", "rouge_l")}
        if o.metric == "macro_f1":
            label_set = m["label_set"]
            index = {lab: i for i, lab in enumerate(label_set)}
            other = len(label_set)  # predictions (or references) outside the label set
            codes = [float(index.get(normalise_text(r), other) * (other + 1) + index.get(normalise_text(p), other))
                     for p, r in zip(preds, refs)]
            ci = bootstrap_ci(codes, stat=_macro_f1_codes(other), n_boot=ctx.n_boot, seed=ctx.seed)
            value = m["macro_f1"]
        else:
            ci = bootstrap_ci(m[o.metric], n_boot=ctx.n_boot, seed=ctx.seed)
            value = means[o.metric]
        samples = [{"source": places[i], "prompt": prompts[i][-300:], "reference": refs[i], "output": preds[i]}
                   for i in range(min(o.samples, len(preds)))]
        return self.make_score(value, len(preds), ci, metric=o.metric, macro_f1=m["macro_f1"], **means,
                               samples=samples)


def _macro_f1_codes(n_labels: int):
    """macro-F1 of encoded (gold, pred) pairs; index n_labels = outside the label set (never a class)."""
    import numpy as np

    k = n_labels + 1

    def stat(codes) -> float:
        codes = np.asarray(codes, dtype=np.int64)
        g, p = codes // k, codes % k
        tp = np.bincount(g[g == p], minlength=k)[:n_labels]
        ng, npred = np.bincount(g, minlength=k)[:n_labels], np.bincount(p, minlength=k)[:n_labels]
        present = (ng + npred) > 0
        return float((2 * tp[present] / (ng + npred)[present]).mean()) if present.any() else 0.0

    return stat


register_probe("generate", GenerateOptions, Generate,
               "greedy generation: exact match, normalised match, macro-F1 over labels, ROUGE-L", cheap=False)
