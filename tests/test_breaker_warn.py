"""Breaker: the tail panel's warning rows are bounded whatever the instance writes (source too)."""

from __future__ import annotations

from client.views.render import WARN_CHARS, warn_line
from jobs import events as ev


def test_a_huge_warning_source_is_cut_like_its_message():
    line = warn_line(ev.Warn(t=0.0, source="s" * 100_000 + "\x1b]0;x\x07", message="m" * 100_000), WARN_CHARS)
    assert len(line) <= WARN_CHARS + 60 and "\x1b" not in line
