"""Canonical record -> token ids + loss mask, the same way on the laptop and on the worker.

A canonical record is `{"messages": [{"role", "content"}, ...]}` (ends with an assistant turn)
or `{"text": str}` (continued pre-training). By concept:

    chat          the conversation rendered with the tokenizer's chat template, and its trained spans
    encoding      one record -> ids + loss mask; data.overlong (`encode`, `apply_overlong`, `explain`)
    batch         `encode_many`: many records, in order, lazily (a tokenizer thread, or processes)
    files         the pre-tokenized split on disk (`TokenWriter`, `write_tokenized`, `load_tokenized`)
    fingerprint   `tokenizer_fingerprint`: whether prepared ids were made by this tokenizer

Imports only the standard library and numpy; the tokenizer is passed in (no torch).
"""

from jobs.tokenize.batch import encode_many
from jobs.tokenize.chat import (
    CHATML_END,
    CHATML_START,
    PLAIN_TEMPLATE,
    TemplateError,
    render_chat,
    render_chatml,
    template_used,
)
from jobs.tokenize.encoding import OVERLONG, Encoded, Refused, apply_overlong, bracketed, encode, explain
from jobs.tokenize.files import TOKENS_DIR, TokenWriter, load_tokenized, write_tokenized
from jobs.tokenize.fingerprint import tokenizer_fingerprint

__all__ = [
    "CHATML_END", "CHATML_START", "OVERLONG", "PLAIN_TEMPLATE", "TOKENS_DIR", "Encoded", "Refused",
    "TemplateError",
    "TokenWriter", "apply_overlong", "bracketed", "encode", "encode_many", "explain", "load_tokenized",
    "render_chat", "render_chatml", "template_used", "tokenizer_fingerprint", "write_tokenized",
]
