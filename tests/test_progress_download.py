"""The model download before launch shows its progress (issue 13): the worker's byte counts become a bar
with bytes and rate in a real terminal (tmux), and one summary line when piped, like rsync's transfers.
Real components: remote_worker.prefetch downloads with huggingface_hub from a stand-in hub on loopback."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import hub
from test_model_source import prefetch

from client import activity
from client.remote.prefetch import prefetch_model
from client.transport.local import LocalTransport
from jobs import events as ev
from jobs.layout import RemoteLayout
from jobs.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
BIG = 24 << 20  # over huggingface_hub's 10 MB chunk, so part of it reaches the disk while the rest waits
HALF = 12 << 20


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64,
                                                    "num_hidden_layers": 2, "intermediate_size": 128}))  # fmt: skip
    (folder / "model.safetensors").write_bytes(os.urandom(BIG))
    return folder


def _held_hub(model: Path, go: Path):
    """The hub, sending the weights' first half and then waiting for `go` before the rest."""
    server = hub("127.0.0.1", {"someone/big": model})
    plain = server.handler._send

    def send(self, code, body=b"", headers=None, length=None):
        if self.command != "GET" or len(body) != BIG:
            return plain(self, code, body, headers, length)
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:HALF])
        self.wfile.flush()
        start = time.monotonic()
        sent, deadline = HALF, time.monotonic() + 600  # a hang guard
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
            # a byte every ~0.5 s while held: huggingface_hub times a read out after 10 s without one (and
            # starts again), which a loaded machine's wait for the bar on screen could outlast
            if time.monotonic() - start >= 0.5:
                self.wfile.write(body[sent : sent + 1])
                sent, start = sent + 1, time.monotonic()
        self.wfile.write(body[sent:])

    server.handler._send = send
    return server


def _spec(tmp_path: Path, url: str) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "t", "instance": {"host": "local", "remote_root": str(tmp_path / "root"), "hf_endpoint": url},
         "model": {"name_or_path": "someone/big", "source": "hf"}, "data": {"train": "t.jsonl"}, "lora": {"r": 8}}
    )  # fmt: skip


def test_the_worker_reports_bytes_from_none_to_all(tmp_path: Path, model: Path) -> None:
    hf = hub("127.0.0.1", {"someone/big": model})
    ms = hub("127.0.0.1", {})
    try:
        result, _ = prefetch(tmp_path, ms, hf, "someone/big", source="hf")
    finally:
        hf.stop()
        ms.stop()
    assert result.ok, result
    events = RemoteLayout(str(tmp_path / "root")).job("job-1").events
    counted = [e for e in map(ev.parse, Path(events).read_text().splitlines()) if e.bytes_total is not None]
    total = counted[0].bytes_total
    assert total >= BIG and counted[0].bytes_done == 0 and counted[-1].bytes_done == total
    dones = [e.bytes_done for e in counted]
    assert dones == sorted(dones) and all(e.bytes_total == total for e in counted)
    assert counted[-1].bytes_per_s and counted[-1].bytes_per_s > 0 and "MB/s" in counted[-1].message


def test_piped_the_download_is_one_summary_line(tmp_path: Path, model: Path) -> None:
    from rich.console import Console

    from client.views.progress import showing

    hf = hub("127.0.0.1", {"someone/big": model})
    out, lines, seen = io.StringIO(), [], []
    try:
        with showing(Console(file=out, width=200)) as view, activity.reporting(lambda a: (seen.append(a), view(a))):
            got = prefetch_model(LocalTransport(), _spec(tmp_path, hf.url), RemoteLayout(
                str(tmp_path / "root")).job("job-1"), str(ROOT), lines.append, poll_s=0.1, progress_every_s=0.1)
    finally:
        hf.stop()
    assert got.download and got.download.ok
    ends = [a for a in seen if a.kind == "end"]
    assert [(a.what, a.unit, a.ok) for a in ends] == [("download someone/big", "bytes", True)]
    assert ends[0].done == ends[0].total >= BIG
    printed = out.getvalue().splitlines()
    assert [ln for ln in printed if "someone/big:" in ln and " in " in ln and "/s)" in ln] == [
        ln for ln in printed if ln.strip().startswith("download someone/big")], printed
    assert len([ln for ln in printed if ln.strip().startswith("download someone/big")]) == 1, printed
    assert not any("%" in ln for ln in lines), lines  # the byte counts went to the bar, not the log
    assert any("downloaded" in ln for ln in lines) and "\x1b" not in out.getvalue()


DRIVER = """
import sys
from pathlib import Path
from rich.console import Console
from client.remote.prefetch import prefetch_model
from client.transport.local import LocalTransport
from client.views.log import printer
from client.views.progress import showing
from jobs.layout import RemoteLayout
from jobs.spec import JobSpec

spec = JobSpec.model_validate_json(Path(sys.argv[1]).read_text())
console = Console(stderr=True)
with showing(console):
    got = prefetch_model(LocalTransport(), spec, RemoteLayout(spec.instance.remote_root).job("job-1"),
                         sys.argv[2], printer(console), poll_s=0.1, progress_every_s=0.1)
print("FINISHED", got.download.ok, flush=True)
"""


def test_a_terminal_shows_the_download_as_a_bar_with_bytes_and_rate(
    tmp_path: Path, model: Path, tmux_socket: str
) -> None:
    go = tmp_path / "go"
    hf = _held_hub(model, go)
    try:
        spec = tmp_path / "spec.json"
        spec.write_text(_spec(tmp_path, hf.url).model_dump_json())
        driver = tmp_path / "driver.py"
        driver.write_text(DRIVER)
        cmd = shlex.join([sys.executable, str(driver), str(spec), str(ROOT)])
        env = f"PYTHONPATH={shlex.quote(str(ROOT))} TERM=xterm-256color COLUMNS=160 NO_PROXY=127.0.0.1"
        subprocess.run(["tmux", "-L", tmux_socket, "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x",
                        "160", "-y", "40", f"env {env} {cmd}; sleep 600"], check=True)  # fmt: skip

        def screen() -> str:
            return subprocess.run(["tmux", "-L", tmux_socket, "capture-pane", "-p", "-t", "t"],
                                  capture_output=True, text=True).stdout  # fmt: skip

        deadline = time.monotonic() + 180
        while not any("download someone/big" in ln and "MB of" in ln for ln in screen().splitlines()):
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)
        bar = next(ln for ln in screen().splitlines() if "download someone/big" in ln and "MB of" in ln)
        assert "MB/s" in bar and "━" in bar and f"of {BIG / 1e6:.1f} MB" in bar, bar
        assert not bar.startswith("download someone/big: 0 B"), bar
        go.touch()
        while "FINISHED" not in screen():
            assert time.monotonic() < deadline + 180, screen()
            time.sleep(0.1)
        done = screen()
    finally:
        go.touch()
        hf.stop()
    assert "FINISHED True" in done, done
    assert f"download someone/big: {BIG / 1e6:.1f} MB in" in done and "MB/s)" in done, done
    assert not any("MB of" in ln for ln in done.splitlines()), done  # the bar is gone, its line stays
    assert "%" not in done, done  # no text progress lines
