"""An Ollama Modelfile beside the GGUF: FROM, TEMPLATE translated from the Jinja chat template, stop parameters.

The translation does not parse Jinja. It renders the tokenizer's own template on sentinel conversations and reads
off each role's prefix and suffix (what comes before and after a message's content), the generation prompt and
any default system prompt; then it checks that those parts rebuild the template's output for a longer
conversation exactly. A template that does not decompose that way (one that merges the system prompt into the
first user turn, say) gets no TEMPLATE line: Ollama then falls back to the chat template stored in the GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass

S, U, R, U2, R2 = "\x01SYS\x01", "\x01USR\x01", "\x01ANS\x01", "\x01USR2\x01", "\x01ANS2\x01"


@dataclass
class ChatParts:
    """Each role's text around its content, the generation prompt, and the template's default system prompt."""

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    default_system: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        roles = {"system": self.system, "user": self.user, "assistant": self.assistant}
        out = ""
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            out += self.system[0] + self.default_system + self.system[1]
        for m in messages:
            pre, post = roles[m["role"]]
            out += pre + m["content"] + post
        return out + (self.generation if add_generation_prompt else "")


def _render(tok, messages, gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _split(block: str, sentinel: str) -> tuple[str, str] | None:
    if block.count(sentinel) != 1:
        return None
    pre, post = block.split(sentinel)
    return pre, post


def chat_parts(tok) -> ChatParts | None:
    """The template's parts, or None when it does not decompose into per-role prefix/suffix (see module doc)."""
    if not getattr(tok, "chat_template", None):
        return None
    sys_msg, u1 = {"role": "system", "content": S}, {"role": "user", "content": U}
    a1, u2, a2 = ({"role": "assistant", "content": R}, {"role": "user", "content": U2},
                  {"role": "assistant", "content": R2})
    try:
        t1, t2, t3 = (_render(tok, c, False) for c in ([sys_msg, u1], [sys_msg, u1, a1], [sys_msg, u1, a1, u2]))
        gen = _render(tok, [sys_msg, u1], True)
        bare = _render(tok, [u1], True)
    except Exception:  # a template that refuses system messages, or alternation, ...: no translation
        return None
    if not (t2.startswith(t1) and t3.startswith(t2) and gen.startswith(t1)):
        return None
    assistant, user = _split(t2[len(t1):], R), _split(t3[len(t2):], U2)
    if assistant is None or user is None or (user[0] + U) not in t1:
        return None
    system = _split(t1[:t1.index(user[0] + U)], S)
    if system is None or t1[t1.index(user[0] + U):] != user[0] + U + user[1]:
        return None
    parts = ChatParts(system, user, assistant, gen[len(t1):])
    head = bare[:bare.index(user[0] + U)] if user[0] + U in bare else None
    if head and head.startswith(system[0]) and head.endswith(system[1]):
        parts.default_system = head[len(system[0]):len(head) - len(system[1])]
    elif head:
        return None
    probe = [sys_msg, u1, a1, u2, a2, {"role": "user", "content": U}]
    if parts.render(probe, True) != _render(tok, probe, True) or parts.render([u1], True) != bare:
        return None
    return parts


def _go(text: str) -> str:
    return text.replace('"""', '\\"\\"\\"')


def go_template(parts: ChatParts) -> str:
    """Ollama's Go template over .Messages (no whitespace trimming: the markers' newlines are part of them)."""
    return ("{{ range .Messages }}"
            f'{{{{ if eq .Role "system" }}}}{_go(parts.system[0])}{{{{ .Content }}}}{_go(parts.system[1])}'
            f'{{{{ else if eq .Role "user" }}}}{_go(parts.user[0])}{{{{ .Content }}}}{_go(parts.user[1])}'
            f'{{{{ else if eq .Role "assistant" }}}}{_go(parts.assistant[0])}{{{{ .Content }}}}'
            f"{_go(parts.assistant[1])}"
            "{{ end }}{{ end }}" + _go(parts.generation))


def stop_words(tok, parts: ChatParts | None) -> list[str]:
    """Where a reply ends: the end-of-turn marker, the next turn's start marker, the eos token."""
    words = []
    if parts is not None:
        turn = parts.user[0].strip()  # the next turn's start: its special token when it begins with one
        specials = [t for t in getattr(tok, "all_special_tokens", []) if t and turn.startswith(t)]
        words += [parts.assistant[1].strip(), max(specials, key=len) if specials else turn.split("\n")[0]]
    if getattr(tok, "eos_token", None):
        words.append(tok.eos_token)
    seen: list[str] = []
    for w in words:
        if w and w not in seen:
            seen.append(w)
    return seen


def modelfile(gguf_name: str, tok, generation: dict | None = None) -> str:
    """The Modelfile text for `gguf_name` (a file in the same folder)."""
    parts = chat_parts(tok)
    lines = [f"# Ollama: ollama create NAME -f Modelfile   (then: ollama run NAME)", f"FROM ./{gguf_name}"]
    if parts is not None:
        lines.append(f'TEMPLATE """{go_template(parts)}"""')
        if parts.default_system:
            lines.append(f'SYSTEM """{_go(parts.default_system)}"""')
    else:
        lines.append("# no TEMPLATE: the chat template did not translate; Ollama reads the one in the GGUF file")
    lines += [f'PARAMETER stop "{w}"' for w in stop_words(tok, parts)]
    gen = generation or {}
    if gen.get("do_sample"):
        for key, param in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                           ("repetition_penalty", "repeat_penalty")):
            if gen.get(key) is not None:
                lines.append(f"PARAMETER {param} {gen[key]}")
    return "\n".join(lines) + "\n"
