"""`host = "local"`: the instance is this machine. Same protocol as SSH, without the network.

Commands run as `bash -lc <command>` in their own process group (so a timeout kills the whole
tree), with every signal at its default and none blocked, as sshd starts a session: an ignored
SIGINT would otherwise pass through exec to a launched job (a shell cannot undo an ignore it started
with), and cancel's SIGINT would never reach it. Files are copied with `rsync -a --partial --mkpath`
when rsync >= 3.2.3 is installed, else with shutil. A leading `~` in a "remote" path is this user's
home ($HOME).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from client.errors import CommandTimedOut, TransferError
from client.transport import rsync
from client.transport.base import Command, Result, check_result, to_shell
from client.transport.paths import expand_home


class LocalTransport:
    where = "local"

    def __init__(self, *, use_rsync: bool | None = None):
        """use_rsync: None = when a recent rsync is installed; False = always shutil."""
        self.use_rsync = rsync.supports_mkpath() if use_rsync is None else use_rsync

    def run(
        self, cmd: Command, *, check: bool = True, timeout: float | None = None, input: str | None = None
    ) -> Result:
        command = to_shell(cmd)
        proc = subprocess.Popen(
            # a login shell like on the instance; `exit $?` keeps bash as the parent, so a command
            # killed by signal N reports 128+N, as over SSH
            ["bash", "-lc", command + "\nexit $?"],
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout can kill every child
            preexec_fn=_default_signals if _inherits_signals() else None,
        )
        try:
            out, err = proc.communicate(None if input is None else input.encode(), timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out, err = _kill_group(proc, exc.stdout or b"", exc.stderr or b"")
            assert timeout is not None
            raise CommandTimedOut(Result.of(command, -1, out, err), timeout, self.where) from None
        except BaseException:  # Ctrl-C: the child is in its own session and would not see it
            _kill_group(proc, b"", b"")
            raise
        result = Result.of(command, proc.returncode, out, err)
        return check_result(result, self.where) if check else result

    def expand(self, path: str) -> str:
        return expand_home(path, os.path.expanduser("~"))

    def put(self, local: Path, remote: str, *, delete: bool = False) -> None:
        self._copy(Path(local), Path(self.expand(remote)), delete=delete)

    def get(self, remote: str, local: Path) -> None:
        self._copy(Path(self.expand(remote)), Path(local), delete=False)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _copy(self, src: Path, dest: Path, *, delete: bool) -> None:
        src, dest = src.absolute(), dest.absolute()
        if not src.exists():
            raise TransferError(f"cannot copy {src}: no such file or folder", hint="check the path")
        if self.use_rsync:
            # a trailing slash copies a folder's contents into dest, like the SSH transport
            s, d = (f"{src}/", f"{dest}/") if src.is_dir() else (str(src), str(dest))
            rsync.run_rsync(rsync.rsync_argv(s, d, delete=delete), where=self.where, attempts=1)
            return
        try:
            if src.is_dir():
                if delete and dest.is_dir():
                    shutil.rmtree(dest)
                shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
        except OSError as exc:
            raise TransferError(f"copying {src} -> {dest} failed: {exc}") from exc


def _inherits_signals() -> bool:
    """Whether this thread blocks, or this process ignores, a signal a command would inherit.

    SIGPIPE and SIGXFSZ, which Python itself ignores, Popen restores; anything else set by whatever
    started this process (`cmd &` in a script ignores SIGINT and SIGQUIT), by a library or a caller.
    """
    if signal.pthread_sigmask(signal.SIG_BLOCK, []):
        return True
    return bool(_ignored() - {signal.SIGPIPE, signal.SIGXFSZ})


def _ignored() -> set[int]:
    try:  # the kernel's own record: a C library's sigaction is not in signal.getsignal
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
        # 1-31: glibc reserves 32 and 33 (Python cannot reset them; some launchers start all with 32
        # ignored), and nothing here sends a real-time signal
        return {n for n in range(1, 32) if mask >> (n - 1) & 1}
    except (OSError, StopIteration, ValueError, IndexError):
        return {s for s in signal.valid_signals() if signal.getsignal(s) is signal.SIG_IGN}


def _default_signals() -> None:
    """Runs in the child between fork and exec: only when needed, as that is unsafe while another
    thread holds a lock (Python's subprocess docs)."""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):  # the C library's reserved real-time signals
                pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _kill_group(proc: subprocess.Popen, out: bytes, err: bytes) -> tuple[bytes, bytes]:
    """Kill the command's process group; what it printed (`out`, `err`: read before the timeout)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        more_out, more_err = proc.communicate(timeout=5)  # everything read so far, and the rest
        return more_out or out, more_err or err
    except subprocess.TimeoutExpired as exc:  # a grandchild left the group and holds the pipes: let it be
        return exc.stdout or out, exc.stderr or err
