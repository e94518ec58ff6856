"""Canonical record -> token ids + loss mask, the same way on the laptop and on the worker.

A canonical record is `{"messages": [{"role", "content"}, ...]}` (ends with an assistant turn)
or `{"text": str}` (continued pre-training). `encode` renders a conversation with the
tokenizer's own chat template and marks as trained (mask 1) exactly the assistant turns'
content plus the end-of-turn text the template writes right after it (`<|im_end|>` for
ChatML, `<|eot_id|>` for Llama 3); whitespace after the end-of-turn token is not trained.
Every token of a text record is trained, with EOS appended.

How the assistant spans are found, for any template: the span of assistant turn i starts
where `render(messages[:i], add_generation_prompt=True)` ends and stops where
`render(messages[:i+1])` ends. If a template rewrites earlier turns (so a prefix is not a
prefix of the whole), the content is searched for instead, plus the special token that
follows it. Token i is trained when its first character lies inside a span.

Without a chat template, conversations are rendered as plain ChatML (documented fallback):
    <|im_start|>{role}\\n{content}<|im_end|>\\n   for every turn, trained span = content<|im_end|>

Pre-tokenized splits are stored as three flat .npy files under `tokens/`:
`{split}.ids.npy` (uint32), `{split}.offsets.npy` (int64, n+1), `{split}.mask.npy` (uint8).

Imports only the standard library and numpy; the tokenizer is passed in (no torch).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OVERLONG = ("drop", "truncate", "fail", "keep")  # "keep": flag only (used for statistics)
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
TOKENS_DIR = "tokens"
_CHUNK = 256


@dataclass
class Encoded:
    input_ids: list[int]
    mask: list[int]  # 1 = trained token
    overlong: bool = False
    full_length: int = 0  # tokens before truncation

    @property
    def trained(self) -> int:
        return sum(self.mask)


class TemplateError(ValueError):
    """The chat template could not render a record (it raised, or it dropped the content)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


# ---------------------------------------------------------------- rendering


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


def explain(tokenizer: Any, record: dict) -> tuple[list[tuple[str, bool]], int, int]:
    """The record as the model sees it, cut into (text, trained) pieces at token boundaries;
    plus the token count and the trained token count. For `--show`."""
    enc = encode(tokenizer, record, 1 << 62, "keep")
    assert enc is not None
    n, trained = len(enc.input_ids), sum(enc.mask)
    if "messages" not in record:
        eos = getattr(tokenizer, "eos_token", None)
        return [(record["text"], True)] + ([(str(eos), True)] if eos else []), n, trained
    text, _ = render_chat(tokenizer, record["messages"])
    starts = [o[0] for o in tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets]
    pieces: list[tuple[str, bool]] = []
    cut = 0
    for i in range(1, n + 1):
        if i == n or enc.mask[i] != enc.mask[i - 1]:
            end = len(text) if i == n else starts[i]
            pieces.append((text[cut:end], bool(enc.mask[i - 1])))
            cut = end
    return pieces, n, trained


# ---------------------------------------------------------------- encoding


def encode(tokenizer: Any, record: dict, max_length: int, overlong: str) -> Encoded | None:
    """Token ids and loss mask of one canonical record.

    overlong: "truncate" cuts to max_length (None if nothing trainable is left), "drop" and
    "fail" return None when the record is longer than max_length (the caller counts or raises),
    "keep" returns it whole with `overlong` set.
    """
    return next(iter(_encode_chunk(tokenizer, [record], max_length, overlong)))


def encode_many(
    tokenizer: Any, records: Iterable[dict], max_length: int, overlong: str, workers: int = 0
) -> Iterator[Encoded | None]:
    """`encode` over many records, in order, lazily (memory stays bounded).

    workers=0 (the default, fastest on 2 cores): in this process; chunks of records are
    rendered and turned into masks in Python while the fast tokenizer's multi-threaded batch
    API, in a background thread without the GIL, tokenizes the chunk before.
    workers>=2: that many processes (fork where safe, else spawn), each single-threaded.
    A TemplateError carries the index of the record that failed.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, not {overlong!r}")
    chunks = _chunks(records, _CHUNK)
    if workers >= 2:
        yield from _encode_pool(tokenizer, chunks, max_length, overlong, workers)
        return
    pending: deque = deque()
    base = 0
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        for chunk in chunks:
            try:
                staged = _stage(tokenizer, chunk)
            except TemplateError as exc:
                exc.index = base + (exc.index or 0)
                raise
            base += len(chunk)
            pending.append((staged, pool.submit(_tokenize_staged, tokenizer, staged)))
            if len(pending) >= 2:
                staged, fut = pending.popleft()
                yield from _finish(tokenizer, staged, fut.result(), max_length, overlong)
        while pending:
            staged, fut = pending.popleft()
            yield from _finish(tokenizer, staged, fut.result(), max_length, overlong)


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for r in records:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class _Staged:
    n: int
    chat_texts: list[str]
    chat_spans: list[list[tuple[int, int]]]
    chat_at: list[int]
    plain_texts: list[str]
    plain_at: list[int]


def _encode_chunk(tokenizer: Any, records: list[dict], max_length: int, overlong: str) -> list[Encoded | None]:
    staged = _stage(tokenizer, records)
    return _finish(tokenizer, staged, _tokenize_staged(tokenizer, staged), max_length, overlong)


def _stage(tokenizer: Any, records: list[dict]) -> _Staged:
    """Render the conversations (Python, holds the GIL)."""
    rend = _renderer(tokenizer)
    st = _Staged(len(records), [], [], [], [], [])
    for i, rec in enumerate(records):
        if "messages" in rec:
            try:
                text, spans = rend.chat(rec["messages"])
            except TemplateError as exc:
                exc.index = i
                raise
            st.chat_texts.append(text)
            st.chat_spans.append(spans)
            st.chat_at.append(i)
        else:
            st.plain_texts.append(rec["text"])
            st.plain_at.append(i)
    return st


def _tokenize_staged(tokenizer: Any, st: _Staged) -> tuple[list, list]:
    """The fast tokenizer's batch API (Rust, all cores, releases the GIL)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"a fast tokenizer (with character offsets) is required, got {type(tokenizer).__name__}")
    chat = backend.encode_batch(st.chat_texts, add_special_tokens=False) if st.chat_texts else []
    plain = backend.encode_batch(st.plain_texts, add_special_tokens=True) if st.plain_texts else []
    return chat, plain


def _finish(tokenizer: Any, st: _Staged, encodings: tuple[list, list], max_length: int, overlong: str):
    """Ids and masks from the encodings (Python)."""
    chat, plain = encodings
    out: list[Encoded | None] = [None] * st.n
    for i, enc, spans, text in zip(st.chat_at, chat, st.chat_spans, st.chat_texts, strict=True):
        ids = enc.ids
        out[i] = _limit(ids, _mask(enc, len(ids), len(text), spans), max_length, overlong)
    eos = getattr(tokenizer, "eos_token_id", None)
    for i, enc in zip(st.plain_at, plain, strict=True):
        ids = enc.ids
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out[i] = _limit(ids, [1] * len(ids), max_length, overlong)
    return out


def _mask(enc: Any, n: int, chars: int, spans: list[tuple[int, int]]) -> list[int]:
    """1 for the tokens whose first character lies in a span. Looks up only the span edges
    (char_to_token); falls back to every token's offsets when an edge is not inside a token."""
    edges = []
    for s, e in spans:
        a, b = _first_token_from(enc, s, n, chars), _first_token_from(enc, e, n, chars)
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
    mask = [0] * n
    for s, e in spans:
        a, b = bisect_left(starts, s), bisect_left(starts, e)
        mask[a:b] = [1] * (b - a)
    return mask


def _limit(ids: list[int], mask: list[int], max_length: int, overlong: str) -> Encoded | None:
    n = len(ids)
    if n <= max_length:
        return Encoded(ids, mask, False, n)
    if overlong == "keep":
        return Encoded(ids, mask, True, n)
    if overlong == "truncate":
        mask = mask[:max_length]
        if not any(mask):
            return None
        return Encoded(ids[:max_length], mask, True, n)
    return None


def apply_overlong(enc: Encoded, max_length: int, overlong: str) -> Encoded | None:
    """Apply data.overlong to a record encoded whole (overlong="keep")."""
    return _limit(enc.input_ids, enc.mask, max_length, overlong)


# ------------------------------------------------------------ process pool

_POOL_TOKENIZER: Any = None


def _pool_init(tokenizer: Any) -> None:
    global _POOL_TOKENIZER
    if tokenizer is not None:
        _POOL_TOKENIZER = tokenizer


def _pool_work(args: tuple[list[dict], int, str]):
    records, max_length, overlong = args
    try:
        encs = _encode_chunk(_POOL_TOKENIZER, records, max_length, overlong)
    except TemplateError as exc:
        return ("error", str(exc), exc.index)
    return ("ok", _pack(encs), None)


def _pack(encs: list[Encoded | None]):
    lens = np.array([-1 if e is None else len(e.input_ids) for e in encs], dtype=np.int64)
    full = np.array([0 if e is None else e.full_length for e in encs], dtype=np.int64)
    over = np.array([False if e is None else e.overlong for e in encs], dtype=bool)
    kept = [e for e in encs if e is not None]
    ids = np.fromiter((t for e in kept for t in e.input_ids), dtype=np.uint32)
    mask = np.fromiter((t for e in kept for t in e.mask), dtype=np.uint8)
    return lens, full, over, ids, mask


def _unpack(packed) -> list[Encoded | None]:
    lens, full, over, ids, mask = packed
    ids, mask = ids.tolist(), mask.tolist()
    out: list[Encoded | None] = []
    pos = 0
    for n, f, o in zip(lens.tolist(), full.tolist(), over.tolist(), strict=True):
        if n < 0:
            out.append(None)
            continue
        out.append(Encoded(ids[pos : pos + n], mask[pos : pos + n], o, f))
        pos += n
    return out


def _encode_pool(tokenizer, chunks: Iterator[list[dict]], max_length: int, overlong: str, workers: int):
    global _POOL_TOKENIZER
    fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each process single-threaded; no fork warning
    try:
        _POOL_TOKENIZER = tokenizer if fork else None
        pool = ctx.Pool(workers, initializer=_pool_init, initargs=(None if fork else tokenizer,))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        pending: deque = deque()
        base = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * workers + 2:  # bounded: back-pressure
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                pending.append((base, pool.apply_async(_pool_work, ((chunk, max_length, overlong),))))
                base += len(chunk)
            if not pending:
                break
            start, res = pending.popleft()
            kind, payload, index = res.get()
            if kind == "error":
                raise TemplateError(payload, start + (index or 0))
            yield from _unpack(payload)
    finally:
        pool.terminate()
        _POOL_TOKENIZER = None


# ------------------------------------------------------------ fingerprint


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the backend tokenizer JSON (without its runtime
    truncation/padding state), the chat template and the special tokens. No file paths."""
    h = hashlib.sha256(b"autodl-run tokenizer v1\n")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True, ensure_ascii=False).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(b"\0template\0" + json.dumps(template, sort_keys=True).encode())
    specials = {k: str(v) for k, v in sorted(dict(getattr(tokenizer, "special_tokens_map", {})).items())}
    h.update(b"\0special\0" + json.dumps(specials, sort_keys=True).encode())
    h.update(b"\0eos\0" + str(getattr(tokenizer, "eos_token_id", None)).encode())
    return h.hexdigest()


# ------------------------------------------------------------ binary files

_HEADER = 128  # fixed .npy header size, so the shape can be written after the data


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    d = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': ({n},), }}"
    body = d.ljust(_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class _NpyAppender:
    """A 1-D .npy file written in pieces: buffered in an array.array, the header's shape last."""

    _FLUSH = 1 << 20

    def __init__(self, path: Path, dtype, code: str):
        self.dtype, self.n = np.dtype(dtype), 0
        self.buf = array(code)
        assert self.buf.itemsize == self.dtype.itemsize
        self.f = open(path, "wb")
        self.f.write(_npy_header(self.dtype, 0))

    def append(self, value: int) -> None:
        self.buf.append(value)
        if len(self.buf) >= self._FLUSH:
            self._flush()

    def add(self, values) -> None:
        self.buf.extend(values)
        if len(self.buf) >= self._FLUSH:
            self._flush()

    def _flush(self) -> None:
        if sys.byteorder != "little":  # pragma: no cover
            self.buf.byteswap()
        self.f.write(self.buf.tobytes())
        self.n += len(self.buf)
        self.buf = array(self.buf.typecode)

    def close(self) -> None:
        self._flush()
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, self.n))
        self.f.close()


class TokenWriter:
    """Appends encoded records to `tokens/{split}.*.npy`, streaming (memory stays bounded)."""

    def __init__(self, dir: str | Path, split: str):
        base = Path(dir) / TOKENS_DIR
        base.mkdir(parents=True, exist_ok=True)
        self.ids = _NpyAppender(base / f"{split}.ids.npy", np.uint32, "I")
        self.offsets = _NpyAppender(base / f"{split}.offsets.npy", np.int64, "q")
        self.mask = _NpyAppender(base / f"{split}.mask.npy", np.uint8, "B")
        self.offsets.add([0])
        self.total = 0
        self.trained = 0
        self.sequences = 0

    def add(self, enc: Encoded) -> None:
        self.ids.add(enc.input_ids)
        self.mask.add(enc.mask)
        self.total += len(enc.input_ids)
        self.trained += sum(enc.mask)
        self.sequences += 1
        self.offsets.append(self.total)

    def close(self) -> dict:
        for a in (self.ids, self.offsets, self.mask):
            a.close()
        return {"sequences": self.sequences, "tokens": self.total, "trained": self.trained}


def write_tokenized(dir: str | Path, split: str, encoded_iter: Iterable[Encoded | None]) -> dict:
    """Write encoded records (None skipped) to `dir/tokens/{split}.*.npy`; returns counts."""
    w = TokenWriter(dir, split)
    try:
        for enc in encoded_iter:
            if enc is not None:
                w.add(enc)
    finally:
        counts = w.close()
    return counts


def load_tokenized(dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids uint32 flat, offsets int64 n+1, mask uint8 flat), memory-mapped. Sequence i is
    ids[offsets[i]:offsets[i+1]]."""
    base = Path(dir) / TOKENS_DIR
    ids = np.load(base / f"{split}.ids.npy", mmap_mode="r")
    offsets = np.load(base / f"{split}.offsets.npy", mmap_mode="r")
    mask = np.load(base / f"{split}.mask.npy", mmap_mode="r")
    if ids.dtype != np.uint32 or offsets.dtype != np.int64 or mask.dtype != np.uint8:
        raise ValueError(f"unexpected dtypes in {base}: {ids.dtype}, {offsets.dtype}, {mask.dtype}")
    if len(ids) != len(mask) or (len(offsets) and offsets[-1] != len(ids)):
        raise ValueError(f"inconsistent token files in {base}")
    return ids, offsets, mask
