"""A real OpenSSH server on 127.0.0.1 for the tests, after numtide/deploykit's tests/sshd.py.

The chain: a free port, a 0700 folder, `ssh-keygen` host and client keys, authorized_keys,
`sshd -D -e -f /dev/null -o ...` (no system config), wait for the `SSH-2.0-OpenSSH_` banner,
terminate in `finally` (see conftest.py). Its sessions get a HOME of their own (`.home`). The same server can be killed (every connection cut
at once, as when an instance vanishes) and started again on the same port with the same keys.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.spec import InstanceSpec

SSHD = "/usr/sbin/sshd"
BANNER = b"SSH-2.0-OpenSSH_"


def missing_tools() -> str | None:
    """Why the SSH tests cannot run here, or None when they can."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    """A new ed25519 key pair at `path` and `path`.pub, without a passphrase."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "autodl-run-test", "-f", str(path)], check=True
    )
    return path


def openssh_version() -> tuple[int, int]:
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _sshd_only(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("sshd"):  # sshd, and sshd-session on OpenSSH >= 9.8
            out.append(pid)
    return out


def _pidfds(pids: list[int]) -> list[tuple[int, int | None]]:
    """(pid, pidfd) for each process still there and still an sshd. A session's pid, once it has exited, can
    soon be another process's (pid_max is 32768 on the test machine and the suite forks a lot): a SIGKILL
    sent by pid after the wait could land on an unrelated process, such as another test's fresh ssh session
    (which then loses its connection mid-command). A pidfd names the process itself, never a later one.
    Where pidfds are not available (a kernel before 5.3, a seccomp profile), the pid alone (pidfd None)."""
    handles: list[tuple[int, int | None]] = []
    for pid in pids:
        try:
            fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except (OSError, AttributeError):
            fd = None
        if _sshd_only([pid]):  # listed as sshd, and still that process now that the pidfd holds it
            handles.append((pid, fd))
        elif fd is not None:
            os.close(fd)
    return handles


def _send(handle: tuple[int, int | None], sig: int) -> None:
    pid, fd = handle
    try:
        if fd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


def _default_signals() -> None:
    """In sshd's child before exec: no signal ignored or blocked, as a daemon started by systemd has it.
    Its sessions inherit what it starts with, and an ignored signal passes through exec: started under a
    profiler (perf ignores SIGUSR2) or a launcher that ignores one, the sessions did too, and the test of
    commands starting with default signals failed for the environment's sake."""
    for sig in range(1, 32):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


@dataclass
class Sshd:
    dir: Path
    port: int
    host: str = "127.0.0.1"
    user: str = field(default_factory=getpass.getuser)
    proc: subprocess.Popen | None = None

    @classmethod
    def create(cls, parent: Path) -> Sshd:
        """Keys and config in a fresh 0700 folder under `parent`; not started yet."""
        d = parent / f"sshd-{os.getpid()}-{time.monotonic_ns()}"
        d.mkdir(mode=0o700, parents=True)
        (d / "home").mkdir()
        keygen(d / "host_ed25519")
        keygen(d / "client_ed25519")
        shutil.copy(d / "client_ed25519.pub", d / "authorized_keys")
        return cls(d, free_port())

    @property
    def home(self) -> Path:
        """$HOME of the login shells this server starts (SetEnv), so `~` and ~/.profile stay in the test."""
        return self.dir / "home"

    @property
    def host_key(self) -> Path:
        return self.dir / "host_ed25519"

    @property
    def identity_file(self) -> Path:
        return self.dir / "client_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def log_path(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        opts = [
            f"HostKey={self.host_key}",
            f"Port={self.port}",
            f"ListenAddress={self.host}",
            f"AuthorizedKeysFile={self.authorized_keys}",
            "StrictModes=no",  # the keys live in a pytest tmp folder
            "PidFile=none",
            "PermitRootLogin=yes",  # CI containers run as root
            "PasswordAuthentication=no",
            "KbdInteractiveAuthentication=no",
            "Subsystem=sftp internal-sftp",
            # HOME of the sessions: a folder of the test's, not the real user's (whose profile may
            # be slow, and whose home the tests should not write to)
            # and one thread per torch process: the test machine runs three pytest processes, each with
            # training workers, on few cores (more threads than cores made training many times slower)
            f"SetEnv=HOME={self.home} OMP_NUM_THREADS=1",
        ]
        if openssh_version() >= (9, 8):
            opts.append("PerSourcePenalties=no")  # else the wrong-key test gets 127.0.0.1 blocked for a while
        return [SSHD, "-D", "-e", "-f", "/dev/null"] + [a for o in opts for a in ("-o", o)]

    def start(self, timeout: float = 120.0) -> Sshd:  # a hang guard: a loaded machine starts sshd slowly
        """Start (or restart) the server on the same port with the same keys; return once it answers."""
        if self.running:
            return self
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # the privilege separation folder
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     preexec_fn=_default_signals)  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log()}")
            if self._banner():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sshd did not answer on port {self.port} within {timeout} s:\n{self.log()}")

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(64).startswith(BANNER)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server and every connection it serves: the link drops mid-whatever.

        Only sshd processes die; the commands they ran keep running, as on an instance whose
        network went away (and no login shell is killed half-way through its profile).
        """
        self._signal_all(signal.SIGKILL)

    def stop(self) -> None:
        """Terminate the server and its connections (the fixtures' finally)."""
        self._signal_all(signal.SIGTERM, then_kill=True)

    def _signal_all(self, sig: int, then_kill: bool = False) -> None:
        if self.proc is None:
            return
        sessions = _pidfds(_sshd_only(descendants(self.proc.pid))) if self.proc.poll() is None else []
        try:
            self.proc.send_signal(sig)
            for handle in sessions:
                _send(handle, sig)
            try:
                self.proc.wait(timeout=60)  # a hang guard
            except subprocess.TimeoutExpired:
                if not then_kill:
                    raise
                self.proc.kill()
                self.proc.wait()
            if then_kill:
                for handle in sessions:
                    _send(handle, signal.SIGKILL)
        finally:
            for _, fd in sessions:
                if fd is not None:
                    os.close(fd)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def instance(self, **overrides: object) -> InstanceSpec:
        """An InstanceSpec that reaches this server (overrides: any InstanceSpec field)."""
        fields: dict = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.identity_file),
            "connect_timeout": 30.0,
        }
        fields.update(overrides)
        return InstanceSpec(**fields)
