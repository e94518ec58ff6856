"""The tokenizer's fingerprint: prepared ids are used by the worker only when it matches."""

from __future__ import annotations

import hashlib
import json
from typing import Any


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
