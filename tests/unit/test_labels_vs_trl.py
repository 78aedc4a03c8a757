"""Our label masks against TRL's SFT dataset preparation, an independent reference (test-only dependency).

The reference is TRL's own pipeline: a real `SFTTrainer` (on a throwaway tiny model) prepares the dataset in
its constructor (`_prepare_dataset`: EOS appending, tokenization, completion/assistant masks, labels), and
we compare its `input_ids` and `labels` with `tokenize_record`'s.

One deliberate design difference, decided in our favour: TRL's conversational prompt/completion mask
trains everything after the generation prompt, which includes the newline the SmolLM2 template writes
after `<|im_end|>`. We train exactly what the model generates at inference: the answer and its
end-of-turn token. Generation stops at `<|im_end|>`; the newline after it is written by the chat
template when the next turn is rendered, never by the model, so training it teaches nothing and only
dilutes the loss. For the exact comparisons the reference therefore gets a copy of the SmolLM2 template
with `{% generation %}` markers around `content + '<|im_end|>'` (not the newline), and TRL's
`assistant_only_loss` masks. Our tokenizer never sees the markers: it finds the spans by diffing renders.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
# SFTConfig's defaults trip a transformers deprecation warning that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

from conftest import TOKENIZER_DIR  # noqa: E402

from sftlab.config import DataSection  # noqa: E402
from sftlab.data.formats import Record  # noqa: E402
from sftlab.data.tokenize import IGNORE, tokenize_record  # noqa: E402

# The SmolLM2 template (tests/assets/smollm2-tokenizer/chat_template.jinja) with generation markers added
# around what we train. Everything outside the markers renders exactly as the original does (asserted below).
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PROMPT_COMPLETION = [
    ("What is 2+2?", " 4"),
    ("Q: capital of France?\nA:", " Paris"),
    ("Capital of France? Answer: ", "Paris"),  # the answer's first token merges with the prompt's space
    ("Hello wor", "ld, and more."),  # a word split across the boundary
    ("Translate to French: cheese\n", "fromage"),
    ("Déjà vu? 😀 ", "Oui — encore."),
]

CHATS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6, as before: add them."}],
    [{"role": "user", "content": "list two"}, {"role": "assistant", "content": "- one\n- two"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": " spaced answer "}],
    [{"role": "user", "content": "Déjà vu?"}, {"role": "assistant", "content": "Oui 😀"}],
    # answers whose first characters merge with the header's newline into one token ("\n\n", "\n "): the
    # merged token carries answer text, so it is trained (TRL's character-based assistant mask agrees)
    [{"role": "user", "content": "code?"}, {"role": "assistant", "content": "\n\n```py\nx = 1\n```"}],
    [{"role": "user", "content": "indent?"}, {"role": "assistant", "content": "  two spaces"}],
]


def _tokenizer(template=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def ours():
    return _tokenizer()


@pytest.fixture(scope="module")
def trl_prepare(tmp_path_factory):
    """rows, template, **SFTConfig options -> [(input_ids, labels)] as TRL's SFTTrainer prepares them."""
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tok = _tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))

    def prepare(rows, template=None, **options):
        tok = _tokenizer(template)
        args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], max_length=None,
                         use_cpu=True, **options)
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
        return [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]

    return prepare


def test_marked_template_renders_like_the_original(ours):
    marked = _tokenizer(MARKED_TEMPLATE)
    for msgs in CHATS:
        for gen in (False, True):
            assert marked.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
                ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_raw_prompt_completion_matches_trl(ours, trl_prepare):
    ref = trl_prepare([{"prompt": p, "completion": c} for p, c in PROMPT_COMPLETION])
    cfg = DataSection(template="raw")
    for (p, c), (ids, labels) in zip(PROMPT_COMPLETION, ref, strict=True):
        ex = tokenize_record(ours, Record("prompt_completion", "t", prompt=p, completion=c), False, cfg)
        assert ex.input_ids == ids, (p, c)
        assert ex.labels == labels, (p, c)


def _conversational_pc(p, c):
    return {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}


def test_chat_prompt_completion_matches_trl(ours, trl_prepare):
    rows = [_conversational_pc(p, c) for p, c in PROMPT_COMPLETION]
    cfg = DataSection(template="chat")
    mine = [tokenize_record(ours, Record("prompt_completion", "t", prompt=p, completion=c), True, cfg)
            for p, c in PROMPT_COMPLETION]

    # Exact: TRL's completion mask AND its assistant mask from the marked template.
    for ex, (ids, labels) in zip(mine, trl_prepare(rows, MARKED_TEMPLATE, assistant_only_loss=True), strict=True):
        assert ex.input_ids == ids
        assert ex.labels == labels

    # TRL's plain completion mask (original template) differs in one place only: the final newline after
    # <|im_end|>, which TRL trains and we do not (see the module docstring for why).
    for ex, (ids, labels) in zip(mine, trl_prepare(rows), strict=True):
        assert ex.input_ids == ids
        assert ours.decode(ids[-1:]) == "\n" and ids[-2] == ours.eos_token_id
        assert labels[-1] == ids[-1] and ex.labels[-1] == IGNORE
        assert ex.labels[:-1] == labels[:-1]


def test_multi_turn_chat_matches_trl_assistant_masks(ours, trl_prepare):
    from trl.chat_template_utils import has_generation_markers

    assert has_generation_markers(MARKED_TEMPLATE) and not has_generation_markers(ours.chat_template)
    ref = trl_prepare([{"messages": m} for m in CHATS], MARKED_TEMPLATE, assistant_only_loss=True)
    cfg = DataSection(template="chat", assistant_turns="all")
    for msgs, (ids, labels) in zip(CHATS, ref, strict=True):
        ex = tokenize_record(ours, Record("chat", "t", messages=msgs), True, cfg)
        assert ex.input_ids == ids
        assert ex.labels == labels, [(ours.decode([i]), a, b) for i, a, b in zip(ids, ex.labels, labels) if a != b]
