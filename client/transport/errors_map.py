"""Turn what paramiko, sockets and the ssh command line report into our error tree.

Every error names the target (user@host:port), what we tried, and what to do next:
- `ConnectError`: the host or port cannot be reached within the connect timeout;
- `AuthError`: the server refused the key (which key, or the agent and default keys);
- `HostKeyError`: the host key differs from the one pinned in our known_hosts file.

`from_exception` maps a Python exception raised while connecting (paramiko, socket);
`from_ssh_stderr` maps the text the `ssh` binary prints (used under rsync).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError

from client.errors import AuthError, ConnectError, HostKeyError, TransportError

DEFAULT_KEYS = "~/.ssh/id_ed25519, ~/.ssh/id_ecdsa, ~/.ssh/id_rsa"


@dataclass(frozen=True)
class SshTarget:
    """Where we connect and with what; enough to write a useful error message."""

    host: str
    port: int
    user: str
    identity_file: str | None
    known_hosts: Path
    connect_timeout: float
    profile: str | None = None  # the host profile this target came from (client.instances.profiles)
    host_key_alias: str | None = None  # the name its host key is pinned under, for a profile

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def trust_command(self) -> str:
        """The explicit command that re-pins this target's host key."""
        if self.profile:
            return f"autodl-run trust {self.profile}"
        return f"autodl-run trust {self.host}" + (f" --port {self.port}" if self.port != 22 else "")

    @property
    def known_hosts_name(self) -> str:
        """The host as known_hosts writes it: `host`, or `[host]:port` off port 22."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def unresolved_error(t: SshTarget, cause: str) -> ConnectError:
    where = f"profile {t.profile}: " if t.profile else ""
    fix = (
        f'log in again with the console\'s command: autodl-run login "ssh -p PORT {t.user}@HOST" --name {t.profile}'
        if t.profile
        else "fix [instance] host (or ssh): copy the current ssh command from the console"
    )
    return ConnectError(
        f"{where}the host name {t.host} does not resolve: {cause}",
        hint=f"check its spelling (and this machine's network/DNS); {fix}",
    )


def connect_error(t: SshTarget, cause: str) -> ConnectError:
    where = f"profile {t.profile}: " if t.profile else ""
    if t.profile:
        fix = f'log in again with it: autodl-run login "ssh -p PORT {t.user}@{t.host}" --name {t.profile}'
    else:
        fix = "copy the current ssh command from the console into [instance] ssh"
    return ConnectError(
        f"{where}cannot reach {t.host} port {t.port} (within the {t.connect_timeout:g} s connect timeout): {cause}",
        hint=(
            "is the instance powered on? AutoDL may change the port (and password) when an instance "
            f"restarts: {fix}"
        ),
    )


def auth_error(t: SshTarget, cause: str = "") -> AuthError:
    if t.profile:
        detail = f" ({cause})" if cause else ""
        return AuthError(
            f"profile {t.profile}: {t.where} refused the key {t.identity_file}{detail}",
            hint=(
                "the key is no longer authorized there (a re-created instance, or authorized_keys was "
                f'edited): log in again, with the password: autodl-run login "ssh -p {t.port} '
                f'{t.user}@{t.host}" --name {t.profile}'
            ),
        )
    if t.identity_file:
        tried = f"the key {t.identity_file}"
        how = (
            f"check identity_file, or authorize the key on the instance: "
            f"ssh-copy-id -i {t.identity_file} -p {t.port} {t.user}@{t.host}"
        )
    else:
        tried = f"the ssh agent and the default keys ({DEFAULT_KEYS})"
        how = (
            "set identity_file in [instance] to a key the instance accepts, or authorize yours with "
            f"ssh-copy-id -p {t.port} {t.user}@{t.host} (AutoDL: the password is in the console)"
        )
    detail = f" ({cause})" if cause else ""
    return AuthError(f"{t.where} refused authentication with {tried}{detail}", hint=how)


def host_key_error(t: SshTarget, detail: str = "") -> HostKeyError:
    if t.profile:
        what = f"profile {t.profile} ({t.where})"
        redo = (
            f"`{t.trust_command}`, then log in again "
            f'(autodl-run login "ssh -p PORT {t.user}@{t.host}" --name {t.profile}) to authorize the key there'
        )
    else:
        what = t.known_hosts_name
        redo = f"`{t.trust_command}` (or: ssh-keygen -R '{t.known_hosts_name}' -f {t.known_hosts})"
    return HostKeyError(
        f"the host key of {what} changed since it was pinned in {t.known_hosts}"
        + (f": {detail}" if detail else "")
        + ". Nothing was run there.",
        hint=(
            "either the instance was re-created behind the same address (AutoDL re-uses host names and "
            f"ports), or someone is intercepting the connection. Only if you know it was re-created: {redo}"
        ),
    )


def from_exception(exc: BaseException, t: SshTarget) -> TransportError:
    """Map an exception raised while connecting or opening a channel."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, paramiko.BadHostKeyException):
        got = f"{exc.key.get_name()} {exc.key.fingerprint}"
        want = f"{exc.expected_key.get_name()} {exc.expected_key.fingerprint}"
        return host_key_error(t, f"got {got}, pinned {want}")
    if isinstance(exc, paramiko.PasswordRequiredException):
        e = auth_error(t, "the key is protected by a passphrase")
        e.hint = (
            f"load it into your ssh agent first (ssh-add {t.identity_file or ''}) or use a key without one"
        )
        return e
    if isinstance(exc, paramiko.AuthenticationException):
        return auth_error(t, str(exc))
    if isinstance(exc, NoValidConnectionsError):
        causes = sorted({getattr(e, "strerror", None) or str(e) for e in exc.errors.values()})
        return connect_error(t, "; ".join(causes))
    if isinstance(exc, socket.gaierror):
        return unresolved_error(t, exc.strerror or str(exc))
    if isinstance(exc, TimeoutError):
        return connect_error(t, "timed out")
    if isinstance(exc, paramiko.SSHException):
        msg = str(exc)
        if "No authentication methods available" in msg:
            return auth_error(t, "no key to offer")
        if "No existing session" in msg:  # the handshake never finished (paramiko gave up waiting)
            return connect_error(t, "no SSH handshake")
        if "banner" in msg.lower():
            return connect_error(t, f"no SSH server answered ({msg.strip()})")
        return connect_error(t, msg or type(exc).__name__)
    if isinstance(exc, OSError | EOFError):
        return connect_error(t, getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
    return TransportError(f"talking to {t.where} failed: {type(exc).__name__}: {exc}")


# What the ssh binary prints (first match wins): (pattern, kind).
_SSH_STDERR = [
    (r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed", "hostkey"),
    (r"Permission denied \((publickey|password|keyboard|gssapi|hostbased)", "auth"),
    (r"Too many authentication failures", "auth"),
    (r"Could not resolve hostname", "resolve"),
    (r"^ssh: connect to host .*", "connect"),  # refused, timed out, no route, unreachable
    (
        r"kex_exchange_identification|Connection (closed|reset) by|Connection timed out during banner",
        "connect",
    ),
    (r"Timeout, server .* not responding|client_loop: send disconnect", "connect"),
]


def from_ssh_stderr(stderr: str, t: SshTarget) -> TransportError | None:
    """The error the ssh binary reported in `stderr`, or None if it reported none we know."""
    for pattern, kind in _SSH_STDERR:
        for line in stderr.splitlines():
            if re.search(pattern, line):
                cause = line.strip().removeprefix("ssh: ")
                if kind == "hostkey":
                    return host_key_error(t)
                if kind == "auth":
                    return auth_error(t, cause)
                if kind == "resolve":
                    return unresolved_error(t, cause)
                return connect_error(t, cause)
    return None
