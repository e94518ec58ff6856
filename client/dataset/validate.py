"""Checks on single fields and on conversations; each failure is a `RecordError(field, reason)`.

Conversation rules: roles are system/user/assistant (also human/gpt/model as in ShareGPT);
an optional system turn comes first; then user and assistant alternate, starting with user
and ending with assistant. Content is a string (or a list of OpenAI text parts, joined);
trailing whitespace is trimmed; empty content is an error, except an empty system turn,
which is dropped.

Tool calls: an assistant turn may carry OpenAI `tool_calls` (its content may then be empty or
null); it is followed by one or more `tool` turns (the results), then the assistant again.
ShareGPT's `function_call` turn (its value a JSON object with name and arguments) is such an
assistant turn and `observation` such a tool turn. Canonical tool calls are
`{"type": "function", "function": {"name", "arguments": object}}` (+ `id` when given).
"""

from __future__ import annotations

import json
from typing import Any, Literal, overload

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_call": "assistant",
}


class RecordError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


@overload
def text(obj: dict, key: str, shown: str, required: Literal[True] = ...) -> str: ...
@overload
def text(obj: dict, key: str, shown: str, required: bool) -> str | None: ...
def text(obj: dict, key: str, shown: str, required: bool = True) -> str | None:
    """A string field, trailing whitespace trimmed. None when optional and absent/empty."""
    value = obj.get(key)
    if value is None:
        if required:
            raise RecordError(shown, "missing field" if key not in obj else "is null")
        return None
    if not isinstance(value, str):
        raise RecordError(shown, f"must be a string, got {type_name(value)}")
    value = value.rstrip()
    if not value.strip():
        if required:
            raise RecordError(shown, "is empty")
        return None
    return value


def content(value: Any, shown: str) -> str:
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        parts = [p.get("text") for p in value]
        if all(isinstance(p, str) for p in parts):
            value = "".join(parts)
    if value is None:
        raise RecordError(shown, "missing content")
    if not isinstance(value, str):
        raise RecordError(shown, f"content must be a string, got {type_name(value)}")
    return value.rstrip()


def as_list(value: Any) -> Any:
    """A JSON list written as a string (a CSV cell) parsed; anything else unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def conversation(
    turns: Any, field: str, role_key: str, content_key: str, system_prompt: str | None = None
) -> list[dict]:
    """Validate a list of turns and return canonical messages."""
    turns = as_list(turns)
    if turns is None:
        raise RecordError(field, "missing field")
    if not isinstance(turns, list):
        raise RecordError(field, f"must be a list of turns, got {type_name(turns)}")
    if not turns:
        raise RecordError(field, "is an empty conversation")
    out: list[dict] = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"must be an object with {role_key!r} and {content_key!r}, got {type_name(turn)}")
        rk, ck = role_key, content_key
        if rk not in turn and "from" in turn:  # accept either shape in either format
            rk, ck = "from", "value"
        elif rk not in turn and "role" in turn:
            rk, ck = "role", "content"
        raw_role = turn.get(rk)
        if raw_role is None:
            raise RecordError(f"{where}.{rk}", "missing role")
        role = ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(
                f"{where}.{rk}", f"unknown role {raw_role!r} (expected one of: {', '.join(ROLES)})"
            )
        calls = None
        if isinstance(raw_role, str) and raw_role.strip().lower() == "function_call":
            calls = [_call(turn.get(ck), f"{where}.{ck}")]
            value = ""
        elif role == "assistant" and turn.get("tool_calls") is not None:
            calls = _calls(turn["tool_calls"], f"{where}.tool_calls")
            value = "" if turn.get(ck) is None else content(turn[ck], f"{where}.{ck}")
        else:
            if ck not in turn:
                raise RecordError(f"{where}.{ck}", "missing field")
            value = content(turn[ck], f"{where}.{ck}")
            if not value.strip():
                if role == "system":
                    continue
                raise RecordError(f"{where}.{ck}", "is empty")
        _check_order(out, role, f"{where}.{rk}", i)
        msg: dict[str, Any] = {"role": role, "content": value}
        if calls is not None:
            msg["tool_calls"] = calls
        if role == "tool":
            msg.update({k: turn[k] for k in ("tool_call_id", "name") if isinstance(turn.get(k), str)})
        out.append(msg)
    if not any(m["role"] != "system" for m in out):
        raise RecordError(field, "has no user or assistant turn")
    if out[-1]["role"] != "assistant" or out[-1].get("tool_calls"):
        raise RecordError(field, f"does not end with an assistant turn (the last turn is {out[-1]['role']})")
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _check_order(out: list[dict], role: str, where: str, i: int) -> None:
    if role == "system":
        if out:
            raise RecordError(where, f"roles out of order: a system turn may only come first (turn {i})")
        return
    prev = out[-1] if out else {"role": "system"}
    if prev["role"] == "user":
        expected: tuple[str, ...] = ("assistant",)
    elif prev["role"] == "assistant" and prev.get("tool_calls"):
        expected = ("tool",)
    elif prev["role"] == "tool":
        expected = ("tool", "assistant")
    else:
        expected = ("user",)
    if role not in expected:
        raise RecordError(where, f"roles out of order: turn {i} is {role}, expected {' or '.join(expected)}")


def _calls(value: Any, where: str) -> list[dict]:
    value = as_list(value)
    if not isinstance(value, list) or not value:
        raise RecordError(where, f"must be a non-empty list of tool calls, got {type_name(value)}")
    return [_call(c, f"{where}[{k}]") for k, c in enumerate(value)]


def _call(value: Any, where: str) -> dict:
    """One tool call (OpenAI's, or ShareGPT's function_call JSON) in canonical form."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RecordError(where, "a function call must be a JSON object with name and arguments") from None
    if not isinstance(value, dict):
        raise RecordError(where, f"a tool call must be an object, got {type_name(value)}")
    fn = value.get("function", value)
    name, args = (fn.get("name"), fn.get("arguments", {})) if isinstance(fn, dict) else (None, None)
    if not isinstance(name, str) or not name.strip():
        raise RecordError(where, "a tool call needs a function name")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RecordError(where, "a tool call's arguments must be JSON") from None
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call
