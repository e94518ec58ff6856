"""Dataset formats -> canonical records (`{"messages": [...]}` or `{"text": ...}`).

    alpaca             instruction, input (optional), output, system (optional),
                       history (optional list of [user, assistant] pairs)
    sharegpt           conversations: [{from: human|gpt|system, value}, ...] (user/assistant too),
                       optional top-level system
    messages           OpenAI: messages: [{role: system|user|assistant, content}, ...]
    prompt_completion  prompt, completion (strings, or lists of messages)
    text               text (continued pre-training: every token trained)

The format is detected per file from its first record, unless `data.format` names one.
`data.columns` maps canonical field names to yours, e.g. {instruction = "question"}; the
keys role/content/from/value rename the fields inside conversation turns.
An alpaca instruction and its input are joined with a newline (as LLaMA-Factory does).
"""

from __future__ import annotations

from typing import Any, get_args

from client.dataset.validate import RecordError, as_list, conversation, text, type_name
from jobs.spec import DataFormat

FORMATS = get_args(DataFormat)[1:]  # all but "auto"
_TURN_KEYS = {"role", "content", "from", "value"}
_EXPECTED = "messages, conversations, instruction+output, prompt+completion or text"


def detect(obj: Any, columns: dict[str, str] | None = None) -> str | None:
    """The format of a row (after renaming its fields with `data.columns`), or None."""
    if not isinstance(obj, dict):
        return None
    if columns:
        obj = rename(obj, columns)
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def rename(obj: dict, columns: dict[str, str]) -> dict:
    """Rename the top-level fields: columns maps canonical names to the file's names."""
    out = dict(obj)
    for canon, src in columns.items():
        if canon not in _TURN_KEYS and canon != src and src in out:
            out[canon] = out.pop(src)
    return out


def undetected_reason(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"its first record is {type_name(obj)}, not an object"
    fields = ", ".join(sorted(map(str, obj))) or "none"
    return f"its first record has the fields [{fields}], expected {_EXPECTED}"


class Normalizer:
    """Turns one parsed row of a known format into a canonical record, or raises RecordError."""

    def __init__(self, fmt: str, columns: dict[str, str] | None = None, system_prompt: str | None = None,
                 detected: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        columns = dict(columns or {})
        self.fmt = fmt
        self.system_prompt = system_prompt
        self.detected = detected  # fmt came from the file's first record (data.format = "auto")
        self.top = {canon: src for canon, src in columns.items() if canon not in _TURN_KEYS and canon != src}
        self.shown = dict(columns)
        self.role_key = columns.get("role", "from" if fmt == "sharegpt" else "role")
        self.content_key = columns.get("content", columns.get("value", "value" if fmt == "sharegpt" else "content"))
        self._fn = getattr(self, "_" + fmt)

    def name(self, canon: str) -> str:
        return self.shown.get(canon, canon)

    def __call__(self, obj: Any) -> dict:
        if not isinstance(obj, dict):
            raise RecordError("", f"expected an object, got {type_name(obj)}")
        obj = rename(obj, self.top) if self.top else obj
        try:
            return self._fn(obj)
        except RecordError as exc:
            other = detect(obj)
            if self.detected and exc.reason == "missing field" and other is not None and other != self.fmt:
                raise RecordError(exc.field, f"missing field: this record is in the {other} format, but the file's "
                                  f"first record made it {self.fmt}: keep one format per file") from None
            raise

    def _conv(self, turns: Any, field: str, system: str | None = None) -> list[dict]:
        return conversation(turns, field, self.role_key, self.content_key, system or self.system_prompt)

    def _alpaca(self, obj: dict) -> dict:
        instruction = text(obj, "instruction", self.name("instruction"))
        extra = text(obj, "input", self.name("input"), required=False)
        output = text(obj, "output", self.name("output"))
        system = text(obj, "system", self.name("system"), required=False) or self.system_prompt
        msgs = [{"role": "system", "content": system}] if system else []
        history = as_list(obj.get("history"))
        if history:
            field = self.name("history")
            if not isinstance(history, list):
                raise RecordError(field, f"must be a list of [user, assistant] pairs, got {type_name(history)}")
            for i, pair in enumerate(history):
                ok = isinstance(pair, (list, tuple)) and len(pair) == 2
                if not ok or not all(isinstance(p, str) and p.strip() for p in pair):
                    raise RecordError(f"{field}[{i}]", "must be a [user, assistant] pair of non-empty strings")
                msgs += [{"role": "user", "content": pair[0].rstrip()}, {"role": "assistant", "content": pair[1].rstrip()}]
        user = f"{instruction}\n{extra}" if extra else instruction
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"messages": msgs}

    def _sharegpt(self, obj: dict) -> dict:
        system = text(obj, "system", self.name("system"), required=False)
        return {"messages": self._conv(_present(obj, "conversations", self.name), self.name("conversations"), system)}

    def _messages(self, obj: dict) -> dict:
        return {"messages": self._conv(_present(obj, "messages", self.name), self.name("messages"))}

    def _prompt_completion(self, obj: dict) -> dict:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            p = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            c = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            return {"messages": self._conv(p + c, self.name("prompt"))}
        user = text(obj, "prompt", self.name("prompt"))
        answer = text(obj, "completion", self.name("completion"))
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

    def _text(self, obj: dict) -> dict:
        return {"text": text(obj, "text", self.name("text"))}


def _present(obj: dict, key: str, name) -> Any:
    """obj[key], or None when absent ("missing field"); a null is said as such."""
    if key in obj and obj[key] is None:
        raise RecordError(name(key), "is null")
    return obj.get(key)
