"""Progress messages from the library (the `log` callbacks), for a person.

The library passes plain text, some of it from the instance (a download's progress, a host's
answer): it is printed as rich `Text`, never parsed as markup, with its control characters
escaped (client.views.text). A message that starts with `✓` reports a step that worked: the
mark is shown green.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.text import Text

from client.views.text import shown

OK = "✓"


def styled(message: str) -> Text:
    text = Text(shown(message))
    if message.startswith(OK):
        text.stylize("green", 0, len(OK))
    return text


def printer(console: Console) -> Callable[[str], None]:
    """A `log` callback that prints each message on `console`."""

    def log(message: str) -> None:
        console.print(styled(message))

    return log
