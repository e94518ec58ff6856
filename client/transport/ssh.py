"""An instance over SSH: paramiko for commands, the system rsync (over the system ssh) for files.

Host keys are trusted on first use and pinned in one known_hosts file (default
`$AUTODL_RUN_HOME/known_hosts`), which paramiko and rsync's ssh both read and write; a changed
key raises HostKeyError. For a host profile (client.instances.profiles) the key is filed under the profile's
alias in its own file, so it stays pinned when the port changes. Keys: `identity_file` only when
given, else the ssh agent and the default keys; a password only for `autodl-run login`. The
connection opens on first use and reopens after it drops.

Files go with rsync; when the instance (or this machine) has no rsync, over SFTP on the same
connection, each file checked against its sha256 afterwards (client.transport.sftp).
"""

from __future__ import annotations

import logging
import math
import os
import select
import shlex
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from client.errors import (
    AuthError,
    CommandTimedOut,
    ConnectError,
    RemoteEnvError,
    TransferError,
    TransportError,
)
from client.home import known_hosts_file
from client.transport import hostkeys, rsync, sftp
from client.transport.base import Command, Result, check_result, to_shell
from client.transport.errors_map import SshTarget, auth_error, from_exception, from_ssh_stderr
from client.transport.paths import expand_home, split_home
from jobs.spec import InstanceSpec

if TYPE_CHECKING:
    from client.instances.profiles import Profile

# paramiko logs failed handshakes with tracebacks; we raise a clear error instead. A NullHandler
# keeps Python's last-resort handler from printing them; an application can still add its own.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

MAX_STDOUT = 64 << 20  # the most a command's output may be: what the instance sends is read into memory
MAX_STDERR = 1 << 20  # of stderr, the last this many bytes are kept
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
    return known_hosts_file()


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
        profile: str | None = None,
        host_key_alias: str | None = None,
        password: Callable[[], str] | None = None,
    ):
        """profile / host_key_alias: the key is pinned under the alias (a profile's own known_hosts).
        password: called at most once, only if the key is refused (`autodl-run login`); never stored."""
        identity = os.path.expanduser(str(identity_file)) if identity_file else None
        self.target = SshTarget(
            host, int(port), user, identity, Path(known_hosts or default_known_hosts()), connect_timeout,
            profile=profile, host_key_alias=host_key_alias,
        )  # fmt: skip
        self.where = self.target.where
        self.keepalive = keepalive
        self.attempts, self.backoff = attempts, backoff  # rsync retries
        self._client: paramiko.SSHClient | None = None
        self._home: str | None = None
        self._mkpath = rsync.supports_mkpath()
        self._lock = threading.Lock()
        self._password = password
        self.used_password = False  # set when the key was refused and the password got us in
        # "rsync" until rsync turns out to be missing on either side, then "sftp" for good
        local_tools = rsync.rsync_version() is not None and shutil.which("ssh") is not None
        self.file_method = "rsync" if local_tools else "sftp"

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

    @classmethod
    def from_profile(cls, profile: Profile, *, connect_timeout: float = 15.0) -> SshTransport:
        """Reach a saved host profile with its key, checking the host key pinned for it."""
        return cls(
            profile.host,
            profile.port,
            profile.user,
            identity_file=profile.identity_file or None,
            known_hosts=profile.known_hosts,
            connect_timeout=connect_timeout,
            profile=profile.name,
            host_key_alias=profile.host_key_alias,
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
        result = Result.of(command, exited, out, err)
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
                if len(out) > MAX_STDOUT:
                    self._drop()  # the command may go on sending: the connection goes with it
                    raise TransportError(
                        f"{self.where} sent more than {MAX_STDOUT >> 20} MiB of output for: {command}",
                        hint="no command of autodl-run prints that much: the instance is not behaving; "
                        "check what is in the job's folder there",
                    )
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                del err[: max(0, len(err) - MAX_STDERR)]  # its end is what error messages show
            if chan.exit_status_ready():
                if chan.eof_received or chan.closed:
                    if not (chan.recv_ready() or chan.recv_stderr_ready()):
                        break
                    continue
                status_at = status_at or time.monotonic()
                if time.monotonic() - status_at > EXIT_STATUS_GRACE:
                    break
            if deadline is not None and time.monotonic() > deadline:
                assert timeout is not None
                raise CommandTimedOut(Result.of(command, -1, bytes(out), bytes(err)), timeout, self.where)
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
        if self.file_method == "rsync":
            try:
                self._rsync(src, self._spec(dst), delete, lambda: self.run(["mkdir", "-p", target_dir]))
                return
            except RemoteEnvError:  # no rsync on the instance: SFTP from now on
                self.file_method = "sftp"
        sftp.put(self, local, dest, delete=delete)

    def get(self, remote: str, local: Path) -> None:
        src_path = self.expand(remote).rstrip("/") or "/"
        local = Path(local).absolute()
        if self.file_method == "rsync":
            is_dir = self.run(["test", "-d", src_path], check=False).ok
            src, dst = (f"{src_path}/", f"{local}/") if is_dir else (src_path, str(local))
            target_dir = local if is_dir else local.parent
            try:
                self._rsync(
                    self._spec(src),
                    dst,
                    False,
                    lambda: target_dir.mkdir(parents=True, exist_ok=True),
                    regular_only=True,  # the instance's symlinks, devices and FIFOs never land here
                )
                return
            except RemoteEnvError:
                self.file_method = "sftp"
        sftp.get(self, src_path, local)

    def open_sftp(self) -> paramiko.SFTPClient:
        """An SFTP session on this connection (the caller closes it)."""
        transport = self._connect()
        try:
            client = paramiko.SFTPClient.from_transport(transport)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TransferError(
                f"{self.where} offers neither rsync nor SFTP ({exc})",
                hint="install rsync there (apt-get install -y rsync), or enable the sftp subsystem of its sshd",
            ) from exc
        if client is None:
            raise TransferError(f"cannot open an SFTP session on {self.where}")
        return client

    def _rsync(
        self, src: str, dst: str, delete: bool, make_dirs: Callable[[], object], *, regular_only: bool = False
    ) -> None:
        self._connect()  # pins the host key and reports connect/auth errors clearly before rsync runs
        for _ in range(2):
            if not self._mkpath:
                make_dirs()
            argv = rsync.rsync_argv(
                src,
                dst,
                ssh=self.ssh_command()[:-1],
                delete=delete,
                mkpath=self._mkpath,
                regular_only=regular_only,
            )
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
        if t.host_key_alias:
            argv += ["-o", f"HostKeyAlias={t.host_key_alias}"]  # the key pinned for the profile, any port
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

    def open(self) -> None:
        """Connect now (authenticate, check the host key) instead of at the first command."""
        self._connect()

    def host_key(self) -> paramiko.PKey | None:
        """The host key of the open connection."""
        transport = self._client.get_transport() if self._client else None
        return transport.get_remote_server_key() if transport is not None else None

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
            try:
                client = self._client_connect()
            except paramiko.PasswordRequiredException as exc:
                raise from_exception(exc, t) from exc  # our key needs a passphrase: no password will help
            except paramiko.AuthenticationException as exc:
                if self._password is None:
                    raise from_exception(exc, t) from exc
                # the key was refused: the password, once (autodl-run login), on a new connection
                password = self._password()
                self._password = None
                try:
                    client = self._client_connect(password)
                except paramiko.AuthenticationException:
                    raise AuthError(
                        f"{t.where} refused the password (and the key {t.identity_file})",
                        hint="copy the password again from the console (AutoDL changes it when the instance "
                        "restarts); scripts can pass it in AUTODL_RUN_PASSWORD",
                    ) from None  # never chain: nothing may hold on to the password
                except Exception as exc2:
                    raise from_exception(exc2, t) from None
                finally:
                    del password
                self.used_password = True
            except Exception as exc:
                raise from_exception(exc, t) from exc
            transport = client.get_transport()
            assert transport is not None
            # an SSH keep-alive every N s, so NAT boxes and proxies keep an idle link open
            transport.set_keepalive(self.keepalive)
            _tcp_keepalive(transport.sock, self.keepalive)
            self._client = client
            return transport

    def _client_connect(self, password: str | None = None) -> paramiko.SSHClient:
        t = self.target
        client = paramiko.SSHClient()
        if t.host_key_alias:
            # a profile: the keys pinned under its alias count for whatever host:port it has now
            name = t.known_hosts_name
            for key in hostkeys.pinned(t.known_hosts, t.host_key_alias):
                client.get_host_keys().add(name, key.get_name(), key)
            client.set_missing_host_key_policy(hostkeys.PinPolicy(t.known_hosts, t.host_key_alias))
        else:
            # pinned keys; a key seen for the first time is saved back to this file
            client.load_host_keys(str(t.known_hosts))
            # trust on first use; a key that differs from the pinned one raises BadHostKeyException
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        use_key = password is None
        try:
            client.connect(
                t.host,
                port=t.port,
                username=t.user,
                password=password,
                key_filename=t.identity_file if use_key else None,
                allow_agent=use_key and t.identity_file is None,  # the agent only when no key is named
                look_for_keys=use_key and t.identity_file is None,  # ~/.ssh/id_* only when no key is named
                timeout=t.connect_timeout,  # TCP connect
                banner_timeout=t.connect_timeout,  # a port forward that accepts but never speaks SSH
                auth_timeout=t.connect_timeout,  # a server that never answers the auth request
                channel_timeout=t.connect_timeout,  # opening a session channel
            )
        except BaseException:
            client.close()
            raise
        return client

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
