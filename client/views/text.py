"""Text from the instance, made safe to show: it is data, never terminal commands nor rich markup.

Event strings, guard messages and log lines come from another machine (and from whatever the
training code printed). Raw, an ESC could retitle the terminal, write the clipboard (OSC 52),
clear the screen or plant a fake hyperlink (OSC 8), and `[link=...]` or a stray `[/]` would be
read as rich markup. `shown` writes every control character as a visible escape (`\\x1b`); callers
then print it as rich `Text`, or through `rich.markup.escape`, never as markup.
"""

from __future__ import annotations

import json
import re

# C0 controls but tab, DEL, C1 controls; and the bidi overrides and isolates, which reorder what
# follows them on screen (a line can then read differently from what it holds)
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _visible(m: re.Match[str]) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    return f"\\x{ord(c):02x}" if ord(c) <= 0xFF else f"\\u{ord(c):04x}"


def shown(text: object) -> str:
    """`text` with every control character written out as a visible escape; tabs kept."""
    return _UNSAFE.sub(_visible, str(text))


def log_line(text: str) -> str:
    """One line of a log for the terminal: a carriage-return progress bar reduced to its last
    state, then `shown`."""
    if "\r" in text:
        text = next((seg for seg in reversed(text.split("\r")) if seg.strip()), "")
    return shown(text)


def json_line(obj: object) -> str:
    """Compact JSON whose strings hold no raw control character (json escapes C0 itself; C1 and
    bidi characters are escaped here, which keeps the JSON valid: they only occur inside strings)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)



UNBOUNDED = 1 << 16


def print_table(console, table) -> None:
    """A table at the terminal's width; piped, as wide as its values, so nothing a person copies (an id, a
    date, a path) is wrapped or cut with an ellipsis."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.console import Console

    wide = Console(file=console.file, width=UNBOUNDED, highlight=False, soft_wrap=True, no_color=True)
    with wide.capture() as cap:
        wide.print(table)
    console.file.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))
