"""One canonical record -> token ids + loss mask (+ what data.overlong does to it).

Token i is trained (mask 1) when any of its characters lies inside a span `chat.render_chat`
gives (a token " Paris" after "[/INST]" is the reply's, though its space is the template's).
Every token of a text record is trained, with EOS appended.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

from jobs.tokenize.chat import TemplateError, _renderer

OVERLONG = ("drop", "truncate", "fail", "keep")  # "keep": flag only (used for statistics)


@dataclass
class Encoded:
    input_ids: list[int]
    mask: list[int]  # 1 = trained token
    overlong: bool = False
    full_length: int = 0  # tokens before truncation
    notes: tuple[str, ...] = ()  # what the chat template did to the record (jobs.tokenize.chat)

    @property
    def trained(self) -> int:
        return sum(self.mask)


@dataclass
class Refused:
    """A record the chat template cannot train, in its place in `encode_many(..., refusals=True)`:
    the canonical field at fault ("messages[0].role", "text", "messages"), why, and what to do."""

    field: str
    reason: str
    hint: str = ""


def explain(tokenizer: Any, record: dict, template_text: bool = False) -> tuple[list[tuple[str, bool]], int, int]:
    """The record as the model sees it, cut into (text, trained) pieces at token boundaries;
    plus the token count and the trained token count. For `--show`."""
    enc = encode(tokenizer, record, 1 << 62, "keep", template_text)
    assert enc is not None
    n, trained = len(enc.input_ids), sum(enc.mask)
    if "messages" not in record:
        eos = getattr(tokenizer, "eos_token", None)
        return [(record["text"], True)] + ([(str(eos), True)] if eos else []), n, trained
    text, _, _ = _renderer(tokenizer, template_text).chat(record["messages"])
    starts = [o[0] for o in tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets]
    pieces: list[tuple[str, bool]] = []
    cut = 0
    for i in range(1, n + 1):
        if i == n or enc.mask[i] != enc.mask[i - 1]:
            end = len(text) if i == n else starts[i]
            pieces.append((text[cut:end], bool(enc.mask[i - 1])))
            cut = end
    return pieces, n, trained


def bracketed(pieces: list[tuple[str, bool]]) -> str:
    """The pieces as one text with [[...]] around the trained ones (golden tests, `--show` off a terminal)."""
    return "".join(f"[[{s}]]" if trained else s for s, trained in pieces)


def encode(tokenizer: Any, record: dict, max_length: int, overlong: str, template_text: bool = False) -> Encoded | None:
    """Token ids and loss mask of one canonical record.

    overlong: "truncate" cuts to max_length (None if nothing trainable is left), "drop" and
    "fail" return None when the record is longer than max_length (the caller counts or raises),
    "keep" returns it whole with `overlong` set.
    """
    enc = next(iter(_encode_chunk(tokenizer, [record], max_length, overlong, template_text)))
    assert not isinstance(enc, Refused)  # without refusals=True a refused record raises TemplateError
    return enc


@dataclass
class _Staged:
    n: int
    chat_texts: list[str]
    chat_spans: list[list[tuple[int, int]]]
    chat_notes: list[tuple[str, ...]]
    chat_at: list[int]
    plain_texts: list[str]
    plain_at: list[int]
    refused: dict[int, Refused]


def _encode_chunk(tokenizer: Any, records: list[dict], max_length: int, overlong: str,
                  template_text: bool = False, refusals: bool = False) -> list[Encoded | Refused | None]:
    staged = _stage(tokenizer, records, template_text, refusals)
    return _finish(tokenizer, staged, _tokenize_staged(tokenizer, staged), max_length, overlong)


def _stage(tokenizer: Any, records: list[dict], template_text: bool = False, refusals: bool = False) -> _Staged:
    """Render the conversations (Python, holds the GIL). refusals: a record the template cannot train
    becomes a Refused in its place (an error about the whole template still raises); else it raises."""
    rend = _renderer(tokenizer, template_text)
    st = _Staged(len(records), [], [], [], [], [], [], {})
    for i, rec in enumerate(records):
        try:  # free for records that render (3.11+); only a refused one takes the except
            if "messages" in rec:
                text, spans, notes = rend.chat(rec["messages"])
                st.chat_texts.append(text)
                st.chat_spans.append(spans)
                st.chat_notes.append(notes)
                st.chat_at.append(i)
            else:
                rend.check_text(rec["text"])
                st.plain_texts.append(rec["text"])
                st.plain_at.append(i)
        except TemplateError as exc:
            exc.index = i
            if not refusals or exc.whole:
                raise
            st.refused[i] = Refused(exc.field, exc.reason, exc.hint)
    return st


def _tokenize_staged(tokenizer: Any, st: _Staged) -> tuple[list, list]:
    """The fast tokenizer's batch API (Rust, all cores, releases the GIL)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"a fast tokenizer (with character offsets) is required, got {type(tokenizer).__name__}")
    if backend.truncation is not None or backend.padding is not None:
        # runtime state left by an earlier call (tok(..., truncation=True)) or shipped in tokenizer.json:
        # it would cut records silently; data.max_length and data.overlong decide lengths here
        backend.no_truncation()
        backend.no_padding()
    chat = backend.encode_batch(st.chat_texts, add_special_tokens=False) if st.chat_texts else []
    plain = backend.encode_batch(st.plain_texts, add_special_tokens=True) if st.plain_texts else []
    return chat, plain


def _finish(tokenizer: Any, st: _Staged, encodings: tuple[list, list], max_length: int, overlong: str):
    """Ids and masks from the encodings (Python)."""
    chat, plain = encodings
    out: list[Encoded | Refused | None] = [None] * st.n
    for i, refused in st.refused.items():
        out[i] = refused
    for i, enc, spans, text, notes in zip(st.chat_at, chat, st.chat_spans, st.chat_texts, st.chat_notes, strict=True):
        ids = enc.ids
        done = out[i] = _limit(ids, _mask(enc, len(ids), len(text), spans), max_length, overlong)
        if done is not None and notes:
            done.notes = notes
    eos = getattr(tokenizer, "eos_token_id", None)
    for i, enc in zip(st.plain_at, plain, strict=True):
        ids = enc.ids
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out[i] = _limit(ids, [1] * len(ids), max_length, overlong)
    return out


def _mask(enc: Any, n: int, chars: int, spans: list[tuple[int, int]]) -> list[int]:
    """1 for the tokens with a character in a span. Looks up only the span edges
    (char_to_token); falls back to every token's offsets when an edge is not inside a token."""
    edges = []
    for s, e in spans:
        a = enc.char_to_token(s) if s < chars else n
        b = _first_token_from(enc, e, n, chars)
        if a is None or b is None:
            return _mask_by_offsets(enc, n, spans)
        edges.append((a, b))
    mask: list[int] = []
    for a, b in edges:
        mask += [0] * (a - len(mask)) + [1] * (b - a)
    mask += [0] * (n - len(mask))
    return mask


def _first_token_from(enc: Any, char: int, n: int, chars: int) -> int | None:
    if char >= chars:
        return n
    t = enc.char_to_token(char)
    if t is None:
        return None
    return t if enc.token_to_chars(t)[0] >= char else t + 1


def _mask_by_offsets(enc: Any, n: int, spans: list[tuple[int, int]]) -> list[int]:
    starts = [o[0] for o in enc.offsets]
    ends = [o[1] for o in enc.offsets]
    mask = [0] * n
    for s, e in spans:
        a, b = bisect_right(ends, s), bisect_left(starts, e)
        mask[a:b] = [1] * (b - a)
    return mask


def _limit(ids: list[int], mask: list[int], max_length: int, overlong: str, notes: tuple = ()) -> Encoded | None:
    n = len(ids)
    if n <= max_length:
        return Encoded(ids, mask, False, n, notes)
    if overlong == "keep":
        return Encoded(ids, mask, True, n, notes)
    if overlong == "truncate":
        mask = mask[:max_length]
        if not any(mask):
            return None
        return Encoded(ids[:max_length], mask, True, n, notes)
    return None


def apply_overlong(enc: Encoded, max_length: int, overlong: str) -> Encoded | None:
    """Apply data.overlong to a record encoded whole (overlong="keep")."""
    return _limit(enc.input_ids, enc.mask, max_length, overlong, enc.notes)
