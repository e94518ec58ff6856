"""What the instance writes is data: a hostile or broken events.jsonl / worker.log must neither crash
`tail` and `status`, nor hang them, nor lose the events after it, nor reach the terminal as escape
sequences or rich markup. Against the real sshd (tests/sshd.py)."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jobfiles import cli
from rich.console import Console

from client.errors import CommandTimedOut
from client.ledger import JobRecord, Ledger
from client.lifecycle.tail import status, tail
from client.remote.follow import CHUNK, Follower, JobStatus, Reconnecting, Skipped, poll_once
from client.transport.local import LocalTransport
from client.transport.ssh import SshTransport
from client.views.render import Progress, event_line, panel
from jobs import events as ev
from jobs.layout import JobPaths, layout_for
from jobs.spec import DataSpec, JobSpec, ModelSpec

JOB = "job-hostile"


def _line(e: Any) -> bytes:
    return (ev.dumps(e) + "\n").encode()


def _step(n: int) -> bytes:
    return _line(ev.Step(step=n, total_steps=10, epoch=0.1 * n, loss=1.0 / n, lr=1e-4, t=1000.0 + n))


def _job(sshd, tmp_path: Path, events: bytes, state: str = "done") -> tuple[JobRecord, Ledger, JobPaths]:
    """A job on the sshd's machine whose event file holds `events`; the ledger is $AUTODL_RUN_HOME's."""
    inst = sshd.instance(remote_root=str(tmp_path / "root"), shutdown_after="never")
    spec = JobSpec(name="t", instance=inst, model=ModelSpec(name_or_path="m"), data=DataSpec(train="x.jsonl"))
    paths = layout_for(spec).job(JOB)
    Path(paths.dir).mkdir(parents=True)
    Path(paths.state).write_text(state)
    if state == "done":
        Path(paths.dir, "exit_code").write_text("0")
    Path(paths.events).write_bytes(events)
    ledger = Ledger()
    ledger.add(JOB, spec, tmp_path / "job.toml", "data", "bundle")
    return ledger.get(JOB), ledger, paths


def _within(fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    """fn() in a thread; fails the test when it has not returned after `timeout` (it hangs or loops)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"still running after {timeout:g} s: it hangs or loops"
    if "error" in box:
        raise box["error"]
    return box["value"]


GOOD = _line(ev.Phase(phase="setup", t=1000.0))
DONE = _line(ev.Done(adapter_path="/a", manifest_sha256="x", steps=2, total_steps=10, t=1100.0))


def test_malformed_unknown_and_wrong_lines_are_skipped_and_counted(
    sshd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = b'{"type": "step", "step": \n' + b'{"type": "reboot", "t": 1}\n' + b'{"type": "step", "step": "x"}\n'
    record, ledger, _ = _job(sshd, tmp_path, GOOD + bad + _step(1) + _step(2) + DONE)
    info = _within(lambda: status(record, Ledger()).as_dict())  # sqlite: a ledger per thread
    assert (info["state"], info["step"], info["skipped_lines"]) == ("done", 2, 3)
    assert "skipped 3 unreadable event lines" in info["warning"]

    out = io.StringIO()
    progress = _within(lambda: tail(record, Ledger(), Console(file=out, width=120), fetch=False, poll_s=0.05))
    assert progress.done is not None and progress.last is not None and progress.last.step == 2
    err = capsys.readouterr().err
    assert err.count("skipped 3 unreadable event lines") == 1, err  # said once, not per line
    assert "step 2/10" in out.getvalue()


def test_invalid_utf8_does_not_move_the_offset_and_the_next_event_arrives(
    ssh_transport: SshTransport, sshd, tmp_path: Path
) -> None:
    record, ledger, paths = _job(sshd, tmp_path, GOOD + b'{"type":"phase","phase":"\xff\xfe\xc3"}\n', "running")
    first = Path(paths.events).read_bytes()
    poll, offset = poll_once(ssh_transport, paths, "events.jsonl", 0)
    assert offset == len(first)  # exactly the bytes of the lines consumed: no re-encoding drift
    assert ev.parse_or_none(poll.lines[-1]) is None
    with open(paths.events, "ab") as f:
        f.write(_step(7))
    poll, offset = poll_once(ssh_transport, paths, "events.jsonl", offset)
    assert [ev.parse(x).step for x in poll.lines] == [7]
    assert offset == len(first) + len(_step(7))
    Path(paths.state).write_text("done")
    info = _within(lambda: status(record, Ledger()).as_dict())  # sqlite: a ledger per thread
    assert (info["step"], info["skipped_lines"]) == (7, 1)


def test_a_line_over_one_mib_is_skipped_whole_and_the_next_event_arrives(
    ssh_transport: SshTransport, sshd, tmp_path: Path
) -> None:
    # 2 MiB, and what follows its first two chunks is a valid event: skipping must not read mid-line
    huge = b"A" * (2 * CHUNK) + _step(99)
    at_limit = _line(ev.Phase(phase="p", message="B" * (ev.MAX_LINE - 80)))
    at_limit = at_limit[:-1] + b" " * (ev.MAX_LINE - len(at_limit) + 1) + b"\n"  # exactly MAX_LINE + newline
    assert len(at_limit) == ev.MAX_LINE + 1
    record, ledger, paths = _job(sshd, tmp_path, GOOD + huge + _step(3) + at_limit + _step(4) + DONE)
    size = Path(paths.events).stat().st_size
    info = _within(lambda: status(record, Ledger()).as_dict())  # sqlite: a ledger per thread
    assert (info["step"], info["skipped_lines"], info["state"]) == (4, 1, "done")

    def read_all() -> tuple[list[bytes], int, int]:
        lines, offset, skipping, skipped = [], 0, False, 0
        while True:
            poll, offset = poll_once(ssh_transport, paths, "events.jsonl", offset, skipping=skipping)
            lines += poll.lines
            skipping, skipped = poll.skipping, skipped + poll.skipped
            if not poll.more:
                return lines, offset, skipped

    lines, offset, skipped = _within(read_all)
    got = [ev.parse(x) for x in lines]
    assert [type(e).__name__ for e in got] == ["Phase", "Step", "Phase", "Step", "Done"]
    assert [e.step for e in got if isinstance(e, ev.Step)] == [3, 4]
    assert (offset, skipped) == (size, 1)

    inst = sshd.instance()
    follower = Follower(
        lambda: SshTransport.from_instance(inst, known_hosts=tmp_path / "known_hosts"),
        paths, "events.jsonl", sleep=lambda _s: None,
    )  # fmt: skip
    items = _within(lambda: list(follower))
    assert [x.lines for x in items if isinstance(x, Skipped)] == [1]
    steps = [ev.parse(x) for batch in items if isinstance(batch, list) for x in batch]
    assert [e.step for e in steps if isinstance(e, ev.Step)] == [3, 4] and follower.offset == size


def test_a_fifo_events_file_does_not_hang_status(sshd, tmp_path: Path) -> None:
    record, ledger, paths = _job(sshd, tmp_path, b"", "running")
    os.unlink(paths.events)
    os.mkfifo(paths.events)
    try:
        info = _within(lambda: status(record, Ledger()).as_dict())  # sqlite: a ledger per thread
        assert "not a regular file" in info["warning"]
        assert info["step"] == 0
    finally:  # the old code's reader blocks on the FIFO forever: let it go
        try:
            os.close(os.open(paths.events, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_a_timed_out_read_is_a_dropped_connection_not_a_hang(sshd, tmp_path: Path) -> None:
    _, _, paths = _job(sshd, tmp_path, GOOD + _step(1) + DONE)
    inst = sshd.instance()
    follower = Follower(
        lambda: SshTransport.from_instance(inst, known_hosts=tmp_path / "known_hosts"),
        paths, "events.jsonl", poll_timeout_s=0.0, sleep=lambda _s: None,
    )  # fmt: skip
    items = []
    for item in follower:
        items.append(item)
        if isinstance(item, Reconnecting):
            assert "timed out" in item.error
            follower.poll_timeout_s = 60.0  # the link "recovers"
    assert isinstance(items[0], Reconnecting)
    assert isinstance(items[-1], JobStatus) and items[-1].state == "done"
    assert [ev.parse(x).type for batch in items if isinstance(batch, list) for x in batch] == [
        "phase", "step", "done",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_a_timeout_keeps_the_partial_output(kind: str, ssh_transport: SshTransport, local_home: Path) -> None:
    transport = ssh_transport if kind == "ssh" else LocalTransport()
    with pytest.raises(CommandTimedOut) as caught:
        # the printfs come first: only a login shell's start (milliseconds at rest) must fit in the 10 s, a
        # margin no loaded machine uses up; the clock starts once the command was started (ssh: its channel)
        transport.run("printf 'so far\\xff'; printf oops >&2; sleep 60", timeout=10)
    res = caught.value.result
    assert (res.stdout_bytes, res.stderr, res.exited) == (b"so far\xff", "oops", -1)
    assert caught.value.stdout == "so far\ufffd" and "timed out after 10 s" in caught.value.message


EVIL_PHASE = "\x1b]0;pwned title\x07[link=https://evil.example]click[/link] [/]"
EVIL_MESSAGE = "\x1b]52;c;ZXZpbA==\x07 \x1b[2J\x1b]8;;https://evil.example\x1b\\docs\x1b]8;;\x1b\\ \u202eexe.txt"
EVIL_HINT = "[bold red]run rm -rf ~[/] \x9b31m"
RAW_SEQUENCES = ("\x1b]0;", "\x1b]52;", "\x1b[2J", "\x1b]8;", "\x07", "\x9b", "\u202e")


def _evil_events() -> list[Any]:
    return [
        ev.Phase(phase=EVIL_PHASE, message=EVIL_MESSAGE, t=1000.0),
        ev.Checkpoint(step=1, path="/ck/\x1b[2Jstep-1", t=1001.0),
        ev.Failed(error_class="\x1b]0;E\x07Err", message=EVIL_MESSAGE, hint=EVIL_HINT, t=1002.0),
    ]


def _assert_clean(text: str) -> None:
    for seq in RAW_SEQUENCES:
        assert seq not in text, repr(seq)


def _panel_text(p: Progress) -> str:
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=True).print(panel(p, "running", note=EVIL_MESSAGE))
    return out.getvalue()


def test_escape_sequences_and_markup_never_reach_the_terminal() -> None:
    p = Progress("job-1")
    for e in _evil_events():
        line = event_line(e)
        assert line is not None, e
        _assert_clean(line)
        assert "\x1b" not in line
        p.apply(e)
        text = _panel_text(p)
        _assert_clean(text)
        if isinstance(e, ev.Phase):
            assert "[link=https://evil.example]" in text and "\\x1b]0;pwned" in text
    assert "[bold red]run rm -rf ~[/]" in text  # the hint, literally
    assert "[bold red]run rm -rf ~[/]" in event_line(_evil_events()[-1])


def test_tail_and_status_show_hostile_text_escaped(sshd, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = b"".join(_line(e) for e in _evil_events()[:2]) + DONE
    record, ledger, paths = _job(sshd, tmp_path, events)
    Path(paths.log).write_bytes(b"loading \x1b]0;t\x07\x1b[2J[link=x]y\n 10%|#\r 50%|###\r100%|#####\n")

    out = io.StringIO()
    tail(record, ledger, Console(file=out, width=120, force_terminal=True), fetch=False, poll_s=0.05, as_json=True)
    lines = capsys.readouterr().out.splitlines()
    _assert_clean("\n".join(lines))
    got = [ev.parse(ln) for ln in lines]  # valid, validated events, their text intact as data
    assert isinstance(got[0], ev.Phase) and (got[0].phase, got[0].message) == (EVIL_PHASE, EVIL_MESSAGE)

    tail(record, ledger, Console(file=out, width=120), fetch=False, poll_s=0.05)
    _assert_clean(out.getvalue())
    assert "[link=https://evil.example]" in out.getvalue()

    tail(record, ledger, Console(file=io.StringIO()), fetch=False, poll_s=0.05, raw=True)
    raw = capsys.readouterr().out
    _assert_clean(raw)
    assert raw.splitlines() == ["loading \\x1b]0;t\\x07\\x1b[2J[link=x]y", "100%|#####"]

    Path(paths.events).write_bytes(events[: -len(DONE)])  # still running: `status` shows the phase
    res = cli("status", JOB)
    _assert_clean(res.stdout)
    assert "[link=https://evil.example]" in res.stdout and "\\x1b[2Jstep-1" in res.stdout
    assert json.loads(cli("status", JOB, "--json").stdout)["phase"] == f"{EVIL_PHASE}: {EVIL_MESSAGE}"


# -- numbers and names that only look like ours (found by the breaker) ------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"step","step":1,"total_steps":10,"epoch":0.1,"loss":1.0,"lr":0.1,"tokens":' + b"9" * 400 + b"}",
        b'{"type":"checkpoint","step":3,"path":"p","bytes":' + b"9" * 30 + b"}",
        b'{"type":"step","step":' + b"9" * 40 + b',"total_steps":10,"epoch":0.1,"loss":1.0,"lr":0.1}',
        b'{"type":"step","step":1,"total_steps":10,"epoch":0.1,"loss":1e308,"lr":0.1}',
    ],
)
def test_numbers_out_of_range_are_not_events(line: bytes) -> None:
    assert ev.parse_or_none(line) is None  # skipped and counted like any bad line: no OverflowError in a view


def test_state_files_and_checkpoint_names_take_ascii_digits_only() -> None:
    from jobs.jobstate import parse_exit_code
    from jobs.layout import checkpoint_step

    assert [parse_exit_code(x) for x in ("²", "٣", "9" * 60, " 137\n", "-9")] == [None, None, None, 137, -9]
    assert [checkpoint_step(x) for x in ("step-" + "9" * 5000, "step-٣", "step-12")] == [None, None, 12]
