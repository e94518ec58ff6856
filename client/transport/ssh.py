"""An instance over SSH: paramiko for commands, the system rsync (over the system ssh) for files.

Host keys are trusted on first use and pinned in one known_hosts file (default
`$AUTODL_RUN_HOME/known_hosts`), which paramiko and rsync's ssh both read and write; a changed
key raises HostKeyError. Keys: `identity_file` only when given, else the ssh agent and the
default keys. The connection opens on first use and reopens after it drops.
"""

from __future__ import annotations

import logging
import math
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from client.errors import ConnectError, TransferError, TransportError
from client.transport import rsync
from client.transport.base import Command, Result, check_result, to_shell
from client.transport.errors_map import SshTarget, auth_error, from_exception, from_ssh_stderr
from client.transport.paths import expand_home, split_home
from jobs.spec import InstanceSpec

# paramiko logs failed handshakes with tracebacks; we raise a clear error instead. A NullHandler
# keeps Python's last-resort handler from printing them; an application can still add its own.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

EXIT_STATUS_GRACE = 2.0  # seconds to wait for EOF after the exit status (a daemon may hold stdout)


def _tcp_keepalive(sock: object, every: int) -> None:
    """Let the kernel declare a silently dead link dead (a command waiting on it then fails, not hangs)."""
    if not isinstance(sock, socket.socket):
        return
    opts = [
        (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),  # TCP keep-alive probes on this connection
        (socket.IPPROTO_TCP, "TCP_KEEPIDLE", every),  # first probe after this many idle seconds
        (socket.IPPROTO_TCP, "TCP_KEEPINTVL", every),  # then one probe every this many seconds
        (socket.IPPROTO_TCP, "TCP_KEEPCNT", 4),  # dead after 4 unanswered probes (like ServerAliveCountMax)
        # how long (ms) sent data may stay unacknowledged before the connection is declared dead
        (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", every * 4 * 1000),
    ]
    for level, name, value in opts:
        opt = getattr(socket, name, None)  # not every platform has every option
        if opt is not None:
            try:
                sock.setsockopt(level, opt, value)
            except OSError:
                pass


def default_known_hosts() -> Path:
    return Path(os.environ.get("AUTODL_RUN_HOME") or "~/.autodl-run").expanduser() / "known_hosts"


class SshTransport:
    def __init__(
        self,
        host: str,
        port: int = 22,
        user: str = "root",
        *,
        identity_file: str | Path | None = None,
        known_hosts: Path | None = None,
        connect_timeout: float = 15.0,
        keepalive: int = 15,
        attempts: int = 3,
        backoff: float = 1.0,
    ):
        identity = os.path.expanduser(str(identity_file)) if identity_file else None
        self.target = SshTarget(
            host, int(port), user, identity, Path(known_hosts or default_known_hosts()), connect_timeout
        )
        self.where = self.target.where
        self.keepalive = keepalive
        self.attempts, self.backoff = attempts, backoff  # rsync retries
        self._client: paramiko.SSHClient | None = None
        self._home: str | None = None
        self._mkpath = rsync.supports_mkpath()
        self._lock = threading.Lock()

    @classmethod
    def from_instance(cls, instance: InstanceSpec, *, known_hosts: Path | None = None) -> SshTransport:
        if not instance.host:
            raise TransportError(f"{instance.describe()} has no host to connect to")
        return cls(
            instance.host,
            instance.port,
            instance.user,
            identity_file=instance.identity_file,
            known_hosts=known_hosts,
            connect_timeout=instance.connect_timeout,
        )

    # -- commands ---------------------------------------------------------------------------

    def run(
        self, cmd: Command, *, check: bool = True, timeout: float | None = None, input: str | None = None
    ) -> Result:
        command = to_shell(cmd)
        chan = self._open_channel()
        try:
            # a login shell, so conda's python is on PATH on AutoDL images; `exit $?` keeps bash as
            # the parent, so a command killed by signal N reports 128+N (paramiko ignores exit-signal)
            chan.exec_command("bash -lc " + shlex.quote(command + "\nexit $?"))
            if input is not None:
                chan.sendall(input.encode())
            chan.shutdown_write()  # the command sees EOF on stdin instead of waiting for more
            exited, out, err = self._collect(chan, command, timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self._drop()
            raise ConnectError(
                f"lost the connection to {self.where} while running: {command} ({exc})",
                hint="run it again; the connection is reopened",
            ) from exc
        finally:
            chan.close()
        result = Result(command, exited, out.decode(errors="replace"), err.decode(errors="replace"))
        return check_result(result, self.where) if check else result

    def _collect(
        self, chan: paramiko.Channel, command: str, timeout: float | None
    ) -> tuple[int, bytes, bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        status_at = None
        while True:
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            if chan.exit_status_ready():
                if chan.eof_received or chan.closed:
                    if not (chan.recv_ready() or chan.recv_stderr_ready()):
                        break
                    continue
                status_at = status_at or time.monotonic()
                if time.monotonic() - status_at > EXIT_STATUS_GRACE:
                    break
            if deadline is not None and time.monotonic() > deadline:
                raise TransportError(f"command timed out after {timeout:g} s on {self.where}: {command}")
            select.select([chan], [], [], 0.1)
        status = chan.recv_exit_status()
        transport = chan.get_transport()
        if status == -1 and transport is not None and transport.is_active():
            err += b"\n(no exit status: the remote shell was killed by a signal)\n"
            status = 255  # what ssh reports in that case
        elif status == -1:  # closed without an exit status: the connection died under us
            self._drop()
            raise ConnectError(
                f"lost the connection to {self.where} while running: {command}",
                hint="run it again; the connection is reopened",
            )
        return status, bytes(out), bytes(err)

    # -- files --------------------------------------------------------------------------------

    def put(self, local: Path, remote: str, *, delete: bool = False) -> None:
        local = Path(local).absolute()
        if not local.exists():
            raise TransferError(f"cannot send {local}: no such file or folder", hint="check the path")
        dest = self.expand(remote).rstrip("/") or "/"
        target_dir = dest if local.is_dir() else (os.path.dirname(dest) or "/")
        src, dst = (f"{local}/", f"{dest}/") if local.is_dir() else (str(local), dest)
        self._rsync(src, self._spec(dst), delete, lambda: self.run(["mkdir", "-p", target_dir]))

    def get(self, remote: str, local: Path) -> None:
        src_path = self.expand(remote).rstrip("/") or "/"
        local = Path(local).absolute()
        is_dir = self.run(["test", "-d", src_path], check=False).ok
        src, dst = (f"{src_path}/", f"{local}/") if is_dir else (src_path, str(local))
        target_dir = local if is_dir else local.parent
        self._rsync(self._spec(src), dst, False, lambda: target_dir.mkdir(parents=True, exist_ok=True))

    def _rsync(self, src: str, dst: str, delete: bool, make_dirs: Callable[[], object]) -> None:
        self._connect()  # pins the host key and reports connect/auth errors clearly before rsync runs
        for _ in range(2):
            if not self._mkpath:
                make_dirs()
            argv = rsync.rsync_argv(src, dst, ssh=self.ssh_command()[:-1], delete=delete, mkpath=self._mkpath)
            try:
                rsync.run_rsync(
                    argv,
                    where=self.where,
                    attempts=self.attempts,
                    backoff=self.backoff,
                    classify=lambda stderr: from_ssh_stderr(stderr, self.target),
                )
                return
            except rsync.MkpathUnsupported:
                self._mkpath = False  # an rsync older than 3.2.3 on one side: make the parents ourselves

    def _spec(self, path: str) -> str:
        host = f"[{self.target.host}]" if ":" in self.target.host else self.target.host
        return f"{self.target.user}@{host}:{path}"

    def ssh_command(self) -> list[str]:
        """The ssh command line (last word: user@host) rsync uses; also good for an interactive shell."""
        t = self.target
        argv = ["ssh", "-p", str(t.port)]
        if t.identity_file:
            argv += ["-i", t.identity_file, "-o", "IdentitiesOnly=yes"]  # only that key, as paramiko does
        argv += [
            "-o", "BatchMode=yes",  # never prompt for a password or passphrase: fail instead
            "-o", "StrictHostKeyChecking=accept-new",  # pin an unknown host key, refuse a changed one
            "-o", f"UserKnownHostsFile={t.known_hosts}",  # the same pinned keys paramiko uses
            "-o", "GlobalKnownHostsFile=/dev/null",  # ... and only those, as paramiko sees them
            "-o", f"ConnectTimeout={max(1, math.ceil(t.connect_timeout))}",  # TCP connect + banner
            "-o", f"ServerAliveInterval={self.keepalive}",  # probe the server when the link is quiet
            "-o", "ServerAliveCountMax=4",  # and give up after 4 unanswered probes
            "-o", "LogLevel=ERROR",  # no "Permanently added ..." chatter; errors still show
        ]  # fmt: skip
        return argv + [f"{t.user}@{t.host}"]

    # -- paths -----------------------------------------------------------------------------------

    @property
    def home(self) -> str:
        """$HOME of the user on the instance (asked once per transport)."""
        if self._home is None:
            self._home = self.run('printf %s "$HOME"').stdout.strip() or "/"
        return self._home

    def expand(self, path: str) -> str:
        """Resolve a leading `~` to the instance's $HOME; other paths are returned as they are."""
        return expand_home(path, self.home) if split_home(path)[0] else path

    # -- the connection ------------------------------------------------------------------------

    def _connect(self) -> paramiko.Transport:
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is not None and transport.is_active():
                return transport
            self._drop()
            t = self.target
            t.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            t.known_hosts.touch(mode=0o600, exist_ok=True)
            if t.identity_file and not os.path.isfile(t.identity_file):
                raise auth_error(t, "the key file does not exist")
            client = paramiko.SSHClient()
            # pinned keys; a key seen for the first time is saved back to this file
            client.load_host_keys(str(t.known_hosts))
            # trust on first use; a key that differs from the pinned one raises BadHostKeyException
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect(
                    t.host,
                    port=t.port,
                    username=t.user,
                    key_filename=t.identity_file,
                    allow_agent=t.identity_file is None,  # the agent only when no key is named
                    look_for_keys=t.identity_file is None,  # ~/.ssh/id_* only when no key is named
                    timeout=t.connect_timeout,  # TCP connect
                    banner_timeout=t.connect_timeout,  # a port forward that accepts but never speaks SSH
                    auth_timeout=t.connect_timeout,  # a server that never answers the auth request
                    channel_timeout=t.connect_timeout,  # opening a session channel
                )
            except Exception as exc:
                client.close()
                raise from_exception(exc, t) from exc
            transport = client.get_transport()
            assert transport is not None
            # an SSH keep-alive every N s, so NAT boxes and proxies keep an idle link open
            transport.set_keepalive(self.keepalive)
            _tcp_keepalive(transport.sock, self.keepalive)
            self._client = client
            return transport

    def _open_channel(self) -> paramiko.Channel:
        for attempt in (1, 2):
            transport = self._connect()
            try:
                return transport.open_session(timeout=self.target.connect_timeout)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                self._drop()  # the link went away while idle: reconnect once and try again
                if attempt == 2:
                    raise from_exception(exc, self.target) from exc
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
