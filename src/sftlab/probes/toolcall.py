"""tool_calls: does the model call a tool when a question needs one, in the right format, and only then?

Rows hold a prompt (`prompt` or `messages`) and a reference answer; a reference holding a call
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` marks a question that needs a tool, any other
reference one that does not. Generation is greedy (as the generate probe). A generated answer is a
well-formed call when it holds exactly one open/close tag pair whose content parses as a JSON object with a
known tool name (one named by the references, or `tools`) and an `arguments` object. Reported, each with a
bootstrap CI over its questions:

- well_formed: share of the tool questions answered with a well-formed call (the score's value);
- right_tool / exact_call: ... with the reference's tool name / name and arguments;
- false_calls: share of the other questions whose answer opens a call anyway (lower is better);
- any_call: share of the tool questions whose answer opens a call, well-formed or not.

Answers are decoded keeping added tokens (the tags may be special tokens) and cut at the end-of-turn token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..configtools import check, doc
from .base import BaseProbe, ProbeContext, bootstrap_ci, register_probe


@dataclass
class ToolCallOptions:
    path: str = doc("rows with 'prompt' (or 'messages') and a reference answer (a call or plain text)", default="")
    open_tag: str = doc("the token that opens a call", default="<tool_call>")
    close_tag: str = doc("the token that closes a call", default="</tool_call>")
    tools: list[str] = doc("known tool names (empty: the names the references call)", default_factory=list)
    max_new_tokens: int = doc("generation budget per prompt", default=64)
    samples: int = doc("generations kept in the score for people to read", default=4)
    limit: int = doc("score a fixed seeded subset of this many rows (0: all)", default=0)
    template: str = doc("how prompts are rendered, as data.template (auto, chat, raw)", default="auto")
    score_name: str = doc("name of the score in trajectory.jsonl (default: tool_calls)", default="")

    def __post_init__(self):
        check(bool(self.path), "path", "tool_calls needs the data file to score")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.limit >= 0 and self.samples >= 0, "limit", "limit and samples must be >= 0")
        check(self.template in ("auto", "chat", "raw"), "template", "auto, chat or raw")


def parse_call(text: str, open_tag: str, close_tag: str) -> dict | None:
    """The call in `text` ({'name', 'arguments'}) when it is exactly one well-formed tagged JSON object."""
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return None
    m = re.search(re.escape(open_tag) + r"(.*)" + re.escape(close_tag), text, flags=re.S)
    if m is None:
        return None
    try:
        obj = json.loads(m.group(1).strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments"),
                                                                                            dict):
        return None
    return obj


def judge(outputs: list[str], refs: list[str], o: ToolCallOptions) -> dict[str, list[float]]:
    """Per-question 0/1 values of each rate, over the questions it is defined on."""
    ref_calls = [parse_call(r, o.open_tag, o.close_tag) for r in refs]
    known = set(o.tools) or {c["name"] for c in ref_calls if c}
    out = {k: [] for k in ("well_formed", "right_tool", "exact_call", "any_call", "false_calls")}
    for text, ref_text, ref in zip(outputs, refs, ref_calls):
        call = parse_call(text, o.open_tag, o.close_tag)
        ok = call is not None and call["name"] in known
        if o.open_tag not in ref_text:  # a question answered plainly
            out["false_calls"].append(float(o.open_tag in text))
            continue
        out["well_formed"].append(float(ok))
        out["right_tool"].append(float(ok and ref is not None and call["name"] == ref["name"]))
        out["exact_call"].append(float(ok and ref is not None and call == ref))
        out["any_call"].append(float(o.open_tag in text))
    return out


def generate_keeping_tags(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device,
                          add_special_tokens: bool) -> list[str]:
    """Greedy answers decoded with every token kept, cut at the first end-of-turn/EOS text."""
    from .generate import greedy_generate

    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, device,
                            add_special_tokens=add_special_tokens, skip_special_tokens=False)
    stops = [t for t in {tokenizer.eos_token, tokenizer.pad_token, "<|im_end|>", "<|endoftext|>"} if t]
    out = []
    for t in texts:
        cut = min([t.find(s) for s in stops if s in t] or [len(t)])
        out.append(t[:cut].strip())
    return out


class ToolCalls(BaseProbe):
    registered = "tool_calls"
    higher_is_better = True
    cheap = False

    def score(self, model, tokenizer, ctx: ProbeContext):
        import numpy as np

        from ..data.tokenize import use_chat_template
        from .generate import load_prompts

        o = self.options
        prompts, refs, places = load_prompts(o.path, "path", o.limit, ctx.seed, o.template, tokenizer,
                                             need_reference=True)
        raw = not use_chat_template(tokenizer, o.template)
        outs = generate_keeping_tags(model, tokenizer, prompts, o.max_new_tokens, ctx.batch_size,
                                     ctx.resolve_device(model), add_special_tokens=raw)
        rates = judge(outs, refs, o)
        extra = {}
        for k, v in rates.items():
            lo, hi = bootstrap_ci(v, n_boot=ctx.n_boot, seed=ctx.seed) if v else (float("nan"),) * 2
            extra[k] = {"value": float(np.mean(v)) if v else float("nan"), "n": len(v), "ci_low": lo, "ci_high": hi}
        wf = rates["well_formed"]
        samples = [{"source": places[i], "prompt": prompts[i][-200:], "reference": refs[i], "output": outs[i]}
                   for i in range(min(o.samples, len(outs)))]
        return self.make_score(extra["well_formed"]["value"], len(wf),
                               (extra["well_formed"]["ci_low"], extra["well_formed"]["ci_high"]),
                               rates=extra, samples=samples)


register_probe("tool_calls", ToolCallOptions, ToolCalls,
               "tool-call format: well-formed calls on questions that need a tool, none on the others "
               "(generation)", cheap=False)
