"""rsync, the way every transport moves files.

`rsync -a --partial --mkpath`: archive mode, keep partly sent files so a retry resumes
(`--partial`), and create missing parent folders (`--mkpath`; without it rsync fails with
code 11). Transient failures (a dropped connection, a timeout) are retried with exponential
backoff; when it gives up, the error says what failed, the last lines rsync printed and a hint.

rsync older than 3.2.3 (macOS ships 2.6.9) lacks `--mkpath`; `supports_mkpath()` tells, and
`MkpathUnsupported` is raised when the *other* side's rsync rejects it, so the caller can
create the parents itself and try again without the flag.

`regular_only` (what a get from the instance uses): `--no-links --no-devices --no-specials`, so
symlinks, devices, FIFOs and sockets on the far side are skipped instead of recreated here.
"""

from __future__ import annotations

import functools
import io
import posixpath
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import cast

from client import activity
from client.errors import ConnectError, RemoteEnvError, TransferError, TransportError
from client.retry import Backoff
from jobs import autodl

# rsync exit codes worth another try: 10 socket I/O, 12 protocol data stream (usually a
# dropped link), 30 I/O timeout, 35 connection timeout, 255 ssh itself failed.
TRANSIENT = frozenset({10, 12, 30, 35, 255})
INSTALL_HINT = "install rsync >= 3.2.3 (Debian/Ubuntu: apt-get install rsync; macOS: brew install rsync)"


class MkpathUnsupported(Exception):
    """An rsync on the way does not know `--mkpath`."""


@functools.cache
def rsync_version() -> tuple[int, ...] | None:
    """This machine's rsync version, or None when rsync is not installed."""
    try:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version\s+v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else None


def supports_mkpath() -> bool:
    v = rsync_version()
    return v is not None and v >= (3, 2, 3)


# What comes from the instance: regular files only, and modes, owners and groups are not the instance's
# to set (with --no-perms rsync leaves an existing file's mode alone: a file hard-linked to a copy
# verified earlier keeps it; the fetch then gives every file a plain mode of its own).
REGULAR_ONLY = ("--no-links", "--no-devices", "--no-specials", "--no-perms", "--no-owner", "--no-group")
# No data either way for this long and rsync gives up (exit 30): an instance that stops answering
# cannot hold a transfer forever. SSH keep-alives alone do not catch a peer that answers them but sends nothing.
IO_TIMEOUT_S = 300


def rsync_argv(
    src: str,
    dest: str,
    *,
    ssh: Sequence[str] | None = None,
    delete: bool = False,
    mkpath: bool = True,
    regular_only: bool = False,
) -> list[str]:
    argv = ["rsync", "-a", "--partial", f"--timeout={IO_TIMEOUT_S}"]
    if regular_only:
        # --checksum: a fetch is seeded with the copy verified before, whose files can have the same size
        # and modification second as changed ones; rsync's quick check would skip them, and every
        # retry would fail verification the same way. Content decides.
        argv += [*REGULAR_ONLY, "--checksum"]
    if mkpath:
        argv.append("--mkpath")
    if delete:
        argv.append("--delete")
    if ssh:
        # rsync splits -e on spaces and honours quotes, so shlex quoting keeps paths with spaces whole.
        argv += ["-e", shlex.join(ssh)]
    return argv + ["--", src, dest]


def run_rsync(
    argv: list[str],
    *,
    where: str,
    attempts: int = 3,
    backoff: float = 1.0,
    classify: Callable[[str], TransportError | None] | None = None,
) -> None:
    """Run rsync, retrying transient failures (`attempts` tries, waits of backoff, 2x, 4x ... seconds);
    raise a TransportError when it gives up."""
    policy = Backoff(attempts=attempts, initial=backoff, factor=2.0)
    rc, stderr, connect_err = 0, "", None
    attempt = 0
    while True:
        attempt += 1
        try:
            if activity.watched() and supports_progress2():
                rc, stderr = _run_with_progress(argv)
            else:
                proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
                rc, stderr = proc.returncode, proc.stderr
        except FileNotFoundError:
            raise TransferError("rsync is not installed on this machine", hint=INSTALL_HINT) from None
        if rc == 0:
            return
        if "mkpath" in stderr and "unknown option" in stderr:
            raise MkpathUnsupported(stderr)
        if re.search(r"rsync: (command )?not found", stderr):
            raise RemoteEnvError(
                f"rsync is not installed on {where}", hint="install it there: apt-get install -y rsync"
            )
        mapped = classify(stderr) if classify else None
        if mapped is not None and not isinstance(mapped, ConnectError):
            raise mapped  # a refused key or a changed host key does not get better by retrying
        connect_err = mapped
        if rc not in TRANSIENT or not policy.retries_after(attempt):
            break
        time.sleep(policy.wait(attempt))
    if connect_err is not None:
        raise connect_err
    src, dest = argv[-2], argv[-1]
    tail = "\n".join("  | " + ln for ln in stderr.strip().splitlines()[-10:])
    raise TransferError(
        f"rsync {src} -> {dest} failed on {where} with exit code {rc} after {attempt} attempt(s)"
        + (f"\n{tail}" if tail else ""),
        hint=_hint(rc, stderr, argv),
    )


def supports_progress2() -> bool:
    v = rsync_version()
    return v is not None and v >= (3, 1, 0)


# `--info=progress2`: one line for the whole transfer, rewritten with \r:
#   "     12,345,678  45%   11.77MB/s    0:00:01 (xfr#3, to-chk=5/10)"
PROGRESS2 = re.compile(rb"^\s*([\d,.]+)\s+(\d+)%\s+([\d.]+)([kMGT]?)B/s")
_SCALE = {b"": 1, b"k": 1 << 10, b"M": 1 << 20, b"G": 1 << 30, b"T": 1 << 40}


def parse_progress2(line: bytes) -> tuple[int, int, float] | None:
    """(bytes sent, percent of the whole, bytes a second) from one rsync progress2 line, or None."""
    m = PROGRESS2.match(line)
    if not m:
        return None
    return (
        int(m.group(1).replace(b",", b"").replace(b".", b"")),
        int(m.group(2)),
        float(m.group(3)) * _SCALE[m.group(4)],
    )


def _label(argv: list[str]) -> str:
    src, dest = argv[-2], argv[-1]
    verb = "upload" if ":" in dest.split("/")[0] else "download" if ":" in src.split("/")[0] else "copy"
    local = src if verb != "download" else dest
    return activity.name_or(f"{verb} {posixpath.basename(local.rstrip('/')) or local}")


def _run_with_progress(argv: list[str]) -> tuple[int, str]:
    """rsync with `--info=progress2` (the whole transfer, not per file; --no-inc-recursive so the
    percentage is of everything), its progress reported as a client.activity Meter. Returns (rc, stderr)."""
    cut = argv.index("--")
    argv = [*argv[:cut], "--info=progress2", "--no-inc-recursive", *argv[cut:]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    out = cast(io.BufferedReader, proc.stdout)  # Popen's pipes are buffered (bufsize=-1): read1 is there
    stderr = proc.stderr
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(stderr.read()), daemon=True)
    reader.start()
    with activity.Meter(_label(argv), "bytes", every=0.1) as m:
        pending = b""
        for chunk in iter(lambda: out.read1(1 << 14), b""):
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in reversed(lines):  # the newest complete line is enough
                got = parse_progress2(line)
                if got:
                    sent, pct, rate = got
                    m.update(sent, total=sent * 100 / pct if pct >= 1 else None, rate=rate)
                    break
        rc = proc.wait()
        reader.join()
        if rc == 0 and m.total:
            m.update(m.done, total=m.done)  # the last line says 100%; the total is what was sent
        m.end(ok=rc == 0)
    return rc, b"".join(err).decode(errors="replace")


def _hint(rc: int, stderr: str, argv: list[str]) -> str:
    if "No space left" in stderr:
        return f"the destination disk is full: free space (df -h) or use the data disk ({autodl.DATA_DISK})"
    if "No such file or directory" in stderr and rc == 23:
        return f"the source does not exist: {argv[-2]}"
    if "Permission denied" in stderr:
        return "a file or folder on the way is not writable (check its owner and permissions)"
    if rc in TRANSIENT:
        return "the connection dropped or stalled: run the same command again, --partial resumes where it stopped"
    return f"run it by hand to see more: {shlex.join(argv)}"
