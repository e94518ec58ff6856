"""A real terminal for tests: a command in a detached tmux session on the test's private socket, its
screen read back with capture-pane, and a wait on what the screen shows (never on a duration)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def start(socket: str, command: str, width: int = 160, height: int = 50, session: str = "t") -> None:
    """Run `command` (a shell line) in a new detached session `width` x `height` on `socket`."""
    subprocess.run(["tmux", "-L", socket, "-f", "/dev/null", "new-session", "-d", "-s", session, "-x", str(width),
                    "-y", str(height), command], check=True)  # fmt: skip


def screen(socket: str, session: str = "t") -> str:
    """What the session's pane shows now."""
    return subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-t", session],
                          capture_output=True, text=True).stdout  # fmt: skip


def wait_for(socket: str, shown: Callable[[str], bool], timeout: float = 120, session: str = "t") -> str:
    """The screen once `shown(screen)` holds; fails the test with the screen after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not shown(text := screen(socket, session)):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text
