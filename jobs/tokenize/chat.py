"""Conversations rendered with the tokenizer's own chat template, and the character spans trained.

The trained parts are exactly the assistant turns' content plus the end-of-turn text the template
writes right after it (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3); whitespace after the
end-of-turn token is not trained.

How the assistant spans are found, for any template: the span of assistant turn i starts
where `render(messages[:i], add_generation_prompt=True)` ends and stops where
`render(messages[:i+1])` ends. If a template rewrites earlier turns (so a prefix is not a
prefix of the whole), the content is searched for instead, plus the special token that
follows it.

Without a chat template, conversations are rendered as plain ChatML (documented fallback):
    <|im_start|>{role}\\n{content}<|im_end|>\\n   for every turn, trained span = content<|im_end|>
"""

from __future__ import annotations

from typing import Any

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


class TemplateError(ValueError):
    """The chat template could not render a record (it raised, or it dropped the content)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class _Renderer:
    """Renders conversations with a tokenizer's chat template, fast (the compiled jinja template
    that `apply_chat_template` itself uses), checked once against `apply_chat_template`."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.source = self.template = getattr(tokenizer, "chat_template", None)
        if isinstance(self.template, dict):  # named templates: use the default one
            self.template = self.template.get("default") or next(iter(self.template.values()), None)
        self.special = _special_token_strings(tokenizer)
        self._fast = None
        if self.template:
            self._fast = self._compile()

    def _compile(self):
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
            kwargs = dict(self.tok.special_tokens_map)
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]

            def fast(messages, gen):
                return compiled.render(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=gen, **kwargs)

            for msgs, gen in ((probe, False), (probe[:1], True)):
                if fast(msgs, gen) != self._slow(msgs, gen):
                    return None
            return fast
        except Exception:
            return None

    def _slow(self, messages, gen):
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def render(self, messages: list[dict], gen: bool = False) -> str:
        try:
            if self._fast is not None:
                return self._fast(messages, gen)
            return self._slow(messages, gen)
        except Exception as exc:
            raise TemplateError(f"the chat template rejected the conversation: {exc}") from None

    def chat(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its trained parts."""
        if not self.template:
            return render_chatml(messages)
        full = self.render(messages)
        spans: list[tuple[int, int]] = []
        cursor = 0
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], True) if i else ""
            upto = full if i == last else self.render(messages[: i + 1])
            start = len(prefix)
            if full.startswith(prefix) and full.startswith(upto) and start >= cursor and len(upto) > start:
                end = len(upto.rstrip())
                if end <= start:
                    end = len(upto)
            else:
                start, end = self._search(full, m["content"], cursor)
            spans.append((start, end))
            cursor = end
        return full, spans

    def _search(self, full: str, content: str, cursor: int) -> tuple[int, int]:
        start = full.find(content, cursor)
        if start < 0:
            raise TemplateError("the chat template does not reproduce an assistant turn's content verbatim")
        end = start + len(content)
        for tok in self.special:
            if full.startswith(tok, end):
                end += len(tok)
                break
        return start, end


def render_chatml(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    parts: list[str] = []
    spans = []
    pos = 0
    for m in messages:
        head = f"{CHATML_START}{m['role']}\n"
        body = m["content"] + CHATML_END
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        piece = head + body + "\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


def _special_token_strings(tok: Any) -> list[str]:
    names = []
    try:
        names = [str(t) for t in tok.all_special_tokens]
    except Exception:
        pass
    try:
        names += [t.content for t in tok.added_tokens_decoder.values() if getattr(t, "special", False)]
    except Exception:
        pass
    return sorted(set(n for n in names if n), key=len, reverse=True)


_RENDERERS: dict[int, tuple[Any, _Renderer]] = {}


def _renderer(tokenizer: Any) -> _Renderer:
    hit = _RENDERERS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer or hit[1].source != getattr(tokenizer, "chat_template", None):
        if len(_RENDERERS) > 8:
            _RENDERERS.clear()
        hit = (tokenizer, _Renderer(tokenizer))
        _RENDERERS[id(tokenizer)] = hit
    return hit[1]


def render_chat(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The text the model sees for a conversation, and the character spans that are trained."""
    return _renderer(tokenizer).chat(messages)
