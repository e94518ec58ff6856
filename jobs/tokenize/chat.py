"""Conversations rendered with the tokenizer's own chat template, and the character spans trained.

Trained: each assistant turn's own text (its content, reasoning and tool calls, as the template
renders them) plus the end-of-turn token the template writes right after it. Never anything of a
system, user or tool turn, and never template text around a reply (role headers, an empty think
block) unless `data.train_template_text` is set.

How a turn's span is found, without searching for its text: the conversation is rendered again
with that one turn's content replaced by a sentinel; the characters that change are the turn's
own text (the longest common prefix and suffix of the two renders bound it). The special token
that follows is its end-of-turn. When the template writes none after the last reply (GLM-4), the
tokenizer's EOS is appended and trained, so the model learns to stop.

What inference sees: when rendering the whole conversation does not start with the prompt the
template gives the last reply (`render(messages[:-1], add_generation_prompt=True)`), as with a
Mistral template that joins the system prompt to the last user turn only, the text trained is
that prompt followed by the last turn as the template renders a reply. Earlier turns are trained
as the template renders them in the history (Qwen3 strips their reasoning); `notes` say so.

Without a chat template (a base model), conversations use PLAIN_TEMPLATE, whose every reply ends
with the tokenizer's real EOS token; the adapter's tokenizer is saved with it.
"""

from __future__ import annotations

import re
from typing import Any

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# The documented plain format for tokenizers without a chat template: it ends each reply with
# the tokenizer's own EOS (`eos_token`), so a base model learns to stop.
PLAIN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}"
    "{%- else %}{{ raise_exception('the plain format has no ' + message['role'] + ' role') }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Assistant:' }}{%- endif %}"
)

SENTINEL = "\ue000\ue001\ue002"  # private-use characters: no template writes them around content
_PRIVATE = range(0xE000, 0xF8FF + 1)

# Behaviours reported per dataset (notes of a record).
DROPS_SYSTEM = "the chat template drops the system prompt"
REWRITES_TURN = "the chat template rewrites an assistant turn's content (e.g. strips earlier reasoning)"
PROMPT_DIFFERS = "the chat template renders the prompt differently once the reply is added; trained with the prompt inference sees"
EOS_ADDED = "the chat template writes no end-of-turn after the last reply; the tokenizer's EOS is appended"
EMPTIED_TURN = ("the chat template renders an assistant turn empty (e.g. a reply of reasoning only, stripped in "
                "the history): that turn is not trained (it would teach an immediate end-of-turn)")
SPECIAL_IN_CONTENT = "a special token of this tokenizer"  # in the TemplateError of a record holding one
NO_END_OF_TURN = "the chat template writes after a reply no token this tokenizer knows as special: no end-of-turn is trained"


_REJECTED = "the chat template rejected the conversation: "
SYSTEM_REFUSED_HINT = ("fold the system prompt into the first user turn (and leave data.system_prompt unset), or set "
                       "model.tokenizer to a tokenizer whose chat template accepts a system turn")
SPECIAL_HINT = ("remove that text from the record, or write it differently; kept, the model would learn the control "
                "token there (an end-of-turn mid-reply: stop early)")


class TemplateError(ValueError):
    """The chat template could not render a record (it raised, or it dropped the content).

    field: where in the canonical record ("messages[0].role", "text"; "messages" when no one field is to
    blame); reason: the message without the field; hint: what to do. whole: the template itself lacks
    something (no template and no EOS, no tool support): every such record fails, one error says it."""

    def __init__(self, message: str, index: int | None = None, *, field: str = "", reason: str = "",
                 hint: str = "", whole: bool = False):
        super().__init__(message)
        self.index = index
        self.field, self.reason, self.hint, self.whole = field, reason or message, hint, whole

    def __reduce__(self):  # crosses process pools whole (index, field, hint, whole)
        return _template_error, (str(self), self.index, self.field, self.reason, self.hint, self.whole)


def _template_error(message, index, field, reason, hint, whole) -> TemplateError:
    return TemplateError(message, index, field=field, reason=reason, hint=hint, whole=whole)


def _lcp(a: str, b: str) -> int:
    """Length of the longest common prefix (slice compares: C speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _lcs(a: str, b: str, limit: int) -> int:
    """Length of the longest common suffix, at most `limit`."""
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Renderer:
    """Renders conversations with a tokenizer's chat template, fast (the compiled jinja template
    that `apply_chat_template` itself uses), checked once against `apply_chat_template`."""

    def __init__(self, tokenizer: Any, template_text: bool = False):
        self.tok = tokenizer
        self.template_text = template_text
        self.source = named = getattr(tokenizer, "chat_template", None)
        if isinstance(named, dict):  # named templates: use the default one
            named = named.get("default") or next(iter(named.values()), None)
        self.plain = not named
        self.template: str = named or PLAIN_TEMPLATE
        self.special = _special_token_strings(tokenizer)
        self._special_re = re.compile("|".join(map(re.escape, self.special))) if self.special else None
        self.eos = getattr(tokenizer, "eos_token", None)
        self._fast = self._compile()
        self._tools: str | None | bool = False  # False: not probed yet; None: renders tools; str: what it lacks
        self._shape: tuple[str, str] | None | bool = False  # the last reply's (head, tail) around its content

    def tool_lack(self) -> str | None:
        """None when the template renders tool calls and tool results, else what it lacks (probed once)."""
        if self._tools is False:
            call = {"type": "function", "function": {"name": SENTINEL, "arguments": {}}}
            probe: list[dict] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "content": SENTINEL[::-1]}, {"role": "assistant", "content": "b"}]
            what = "the plain format (the tokenizer has no chat template)" if self.plain else "the chat template"
            try:
                text = self.render(probe)
            except TemplateError as exc:
                self._tools = f"{what} does not render tool calls or tool results ({exc})"
            else:
                if SENTINEL not in text:
                    self._tools = f"{what} does not render tool calls (an assistant turn's tool_calls)"
                elif SENTINEL[::-1] not in text:
                    self._tools = f"{what} does not render tool results (role \"tool\")"
                else:
                    self._tools = None
        return self._tools  # type: ignore[return-value]

    def _reply_shape(self) -> tuple[str, str] | None:
        """(head, tail): the text the template writes after the generation prompt around a last reply's
        content, from a probe conversation (found once); None when the probe does not show one."""
        if self._shape is False:
            probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}]
            try:
                prompt, full = self.render(probe[:1], True), self.render(probe)
            except TemplateError:
                prompt, full = "", ""
            at = full.find(SENTINEL, len(prompt))
            ok = full.startswith(prompt) and at >= 0 and SENTINEL not in full[at + 1:]
            self._shape = (full[len(prompt):at], full[at + len(SENTINEL):]) if ok else None
        return self._shape  # type: ignore[return-value]

    def _last_span(self, text: str, prompt: str, content: str) -> tuple[int, int] | None:
        """The last reply's content span without rendering it again, when the text after its prompt
        is exactly the probe's head + this content (as is, or trimmed) + the probe's tail."""
        shape = self._reply_shape()
        if shape is None or self.template_text:
            return None
        head, tail = shape
        start, end = len(prompt) + len(head), len(text) - len(tail)
        if text.startswith(head, len(prompt)) and text.endswith(tail) and text[start:end] in (content, content.strip()):
            return start, end
        return None

    def _compile(self):
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
            kwargs = dict(self.tok.special_tokens_map)
            kwargs.setdefault("eos_token", self.eos)

            def fast(messages, gen):
                return compiled.render(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=gen, **kwargs)

            if self.plain:
                return fast
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
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
            raise TemplateError(f"{_REJECTED}{exc}") from None

    # -------------------------------------------------------------------- composing

    def _compose(self, messages: list[dict], whole: bool) -> str:
        """The text trained: the whole render, or (whole=False) the last reply's prompt + the reply."""
        if whole:
            return self.render(messages)
        return self.render(messages[:-1], True) + self._reply(messages)

    def _reply(self, messages: list[dict]) -> str:
        """The last turn as the template renders a reply, after its own generation prompt
        (rendered after the last user turn alone, which holds for templates whose reply does
        not depend on the history)."""
        k = len(messages) - 1
        while k > 0 and messages[k - 1]["role"] != "user":
            k -= 1
        short = messages[max(k - 1, 0):]
        prompt, full = self.render(short[:-1], True), self.render(short)
        if not full.startswith(prompt):
            raise TemplateError("the chat template renders a reply that does not start with its generation prompt")
        return full[len(prompt):]

    def chat(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]], tuple[str, ...]]:
        """The rendered conversation, the character spans of its trained parts, and notes on
        what the template did to the record (DROPS_SYSTEM, REWRITES_TURN, ...)."""
        if self.plain and not self.eos:
            raise TemplateError("the tokenizer has neither a chat template nor an EOS token: a reply could not end",
                                field="model.tokenizer", whole=True,
                                hint="set model.tokenizer to a tokenizer with a chat template or an EOS token")
        self._check_no_special(messages)
        if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            lack = self.tool_lack()
            if lack:
                raise TemplateError(f"{lack}: this record has tool calls; train a model whose template supports "
                                    "tools, or leave such records out", whole=True)
        try:
            return self._chat(messages)
        except TemplateError as exc:  # only a failing record pays for finding what to blame
            if not exc.field and not exc.whole:
                self._blame(messages, exc)
            raise

    def _blame(self, messages: list[dict], exc: TemplateError) -> None:
        """Name the field at fault: a system turn the template refuses (Gemma), else the conversation."""
        exc.field = "messages"
        if messages[0]["role"] != "system" or len(messages) < 2:
            return
        try:
            self.render(messages)
        except TemplateError:
            try:
                self.render(messages[1:])
            except TemplateError:
                return
            exc.field, exc.hint = "messages[0].role", SYSTEM_REFUSED_HINT
            exc.reason = f"the chat template refuses a system turn: {exc.reason.removeprefix(_REJECTED)}"
            exc.args = (f"{exc.field}: {exc.reason}",)

    def _chat(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]], tuple[str, ...]]:
        notes: list[str] = []
        mark = _sentinel(messages)
        full = self.render(messages)
        prompt = self.render(messages[:-1], True)
        whole = full.startswith(prompt)
        text = full if whole else prompt + self._reply(messages)
        if not whole:
            notes.append(PROMPT_DIFFERS)
        if messages[0]["role"] == "system" and messages[0]["content"] not in text:  # found: not dropped
            if self._compose(_with(messages, 0, {"role": "system", "content": mark}), whole) == text:
                notes.append(DROPS_SYSTEM)
        spans: list[tuple[int, int]] = []
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if m["role"] == "tool":
                self._check_tool(messages, i, text, whole, mark)
            if m["role"] != "assistant":
                continue
            fast = self._last_span(text, prompt, m["content"]) if whole and i == last and not m.get("tool_calls") else None
            start, own, end = (fast[0], *fast) if fast is not None else self._span(messages, i, text, whole, mark)
            # the turn's own text (never the template text trained with it) is what may be rewritten
            if fast is None and not m.get("tool_calls") and text[own:end] != m["content"] and (
                    _squash(text[own:end]) != _squash(m["content"])):
                notes.append(REWRITES_TURN)
            if not m.get("tool_calls") and not text[start:end].strip():
                notes.append(EMPTIED_TURN)
                continue
            eot = next((t for t in self.special if text.startswith(t, end)), None)
            if eot is not None:
                end += len(eot)
            elif i == last and not text[end:].strip() and self.eos:
                text = text[:end] + self.eos + text[end:]
                end += len(self.eos)
                notes.append(EOS_ADDED)
            else:
                notes.append(NO_END_OF_TURN)
            if spans and start < spans[-1][1]:
                raise TemplateError("the chat template's assistant turns overlap")
            spans.append((start, end))
        return text, spans, tuple(dict.fromkeys(notes))

    def check_text(self, text: str) -> None:
        """A `text` record (continued pre-training) is tokenized whole too: the same rule as content."""
        hit = self._special_re.search(text) if self._special_re is not None else None
        if hit:
            reason = f"holds {hit.group()!r}, {SPECIAL_IN_CONTENT}; it would be read as that control token, not as text"
            raise TemplateError(f"text: {reason}", field="text", reason=reason, hint=SPECIAL_HINT)

    def _check_no_special(self, messages: list[dict]) -> None:
        """Content is tokenized as part of the rendered text: a special token's text in it would become
        that control token (an end-of-turn inside a reply teaches the model to stop there)."""
        if self._special_re is None:
            return
        for i, m in enumerate(messages):
            for key in ("content", "reasoning_content", "tool_calls"):
                value = m.get(key)
                hit = next(filter(None, map(self._special_re.search, _strings(value))), None)
                if hit:
                    reason = f"holds {hit.group()!r}, {SPECIAL_IN_CONTENT}; it would be read as that control token, not as text"
                    raise TemplateError(f"turn {i} ({m['role']}) {key}: {reason}", field=f"messages[{i}].{key}",
                                        reason=reason, hint=SPECIAL_HINT)

    def _span(self, messages: list[dict], i: int, text: str, whole: bool, mark: str) -> tuple[int, int, int]:
        """(trained start, own start, end) of turn i in `text`: its own text is what changes when its
        content is replaced by the sentinel `mark`; training may start earlier, at its prompt's end."""
        m = messages[i]
        alt = self._compose(_with(messages, i, {"role": "assistant", "content": mark}), whole)
        if alt == text:
            raise TemplateError(f"the chat template drops assistant turn {i}", field=f"messages[{i}].content")
        if m.get("tool_calls"):
            bare = {k: v for k, v in m.items() if k != "tool_calls"}
            if self._compose(_with(messages, i, bare), whole) == text:
                raise TemplateError("the chat template does not render tool calls (an assistant turn's "
                                    "tool_calls are dropped): use a model whose template supports tools", whole=True)
        start = own = _lcp(text, alt)
        end = len(text) - _lcs(text, alt, min(len(text), len(alt)) - start)
        at = alt.find(mark)
        if self.template_text or (at >= 0 and start < at):
            # template text counts as the reply's (asked for), or the content changed the
            # scaffolding before it (its reasoning fills the think block): train from the prompt's end
            before = self.render(messages[:i], True) if i else ""
            if text.startswith(before) and len(before) <= start:
                start = len(before)
        return start, own, end

    def _check_tool(self, messages: list[dict], i: int, text: str, whole: bool, mark: str) -> None:
        alt = self._compose(_with(messages, i, {**messages[i], "content": mark}), whole)
        if alt == text:
            raise TemplateError("the chat template does not render tool results (role \"tool\"): "
                                "use a model whose template supports tools", whole=True)


def _strings(x: Any):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def _sentinel(messages: list[dict]) -> str:
    """Three private-use characters none of which the record holds: a turn whose content begins or
    ends with one of the sentinel's characters would otherwise share a prefix or suffix with it and
    its span would be off by those characters."""
    blob = "".join(_strings(messages))
    if not any(c in blob for c in SENTINEL):
        return SENTINEL
    used = set(blob)
    free = [chr(c) for c in _PRIVATE if chr(c) not in used][:3]  # any three: they need not be neighbours
    if len(free) == 3:
        return "".join(free)
    raise TemplateError("the record uses every private-use character (U+E000..U+F8FF): its trained "
                        "spans could not be found")


def _squash(s: str) -> str:
    return "".join(s.split())


def _with(messages: list[dict], i: int, m: dict) -> list[dict]:
    out = list(messages)
    out[i] = m
    return out


def render_chatml(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Plain ChatML, for showing a record when no tokenizer is at hand (`prepare --show`)."""
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


_RENDERERS: dict[tuple[int, bool], tuple[Any, _Renderer]] = {}


def _renderer(tokenizer: Any, template_text: bool = False) -> _Renderer:
    key = (id(tokenizer), template_text)
    hit = _RENDERERS.get(key)
    if hit is None or hit[0] is not tokenizer or hit[1].source != getattr(tokenizer, "chat_template", None):
        if len(_RENDERERS) > 8:
            _RENDERERS.clear()
        hit = (tokenizer, _Renderer(tokenizer, template_text))
        _RENDERERS[key] = hit
    return hit[1]


def template_used(tokenizer: Any) -> tuple[str, str]:
    """("tokenizer" | "plain", the template text) that conversations are rendered with."""
    r = _renderer(tokenizer)
    return ("plain" if r.plain else "tokenizer"), r.template


def render_chat(tokenizer: Any, messages: list[dict], template_text: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The text the model sees for a conversation, and the character spans that are trained."""
    text, spans, _ = _renderer(tokenizer, template_text).chat(messages)
    return text, spans
