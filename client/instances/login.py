"""`autodl-run login "ssh -p PORT root@HOST" [--name NAME]`: from a pasted login command to a host profile.

1. parse the command (`-p`, `user@host`, `-i KEY`, `-o Port=N`; anything else is refused);
2. connect with the tool's own key (client.instances.keys) or the `-i` key; only if it is refused, take the
   password once (the AUTODL_RUN_PASSWORD environment variable, else a prompt) and connect with it;
3. add the key's public half to `~/.ssh/authorized_keys` there, unless it is already in it;
4. connect again with the key alone, to prove the next command will not need the password;
5. save the profile (client.instances.profiles) and its pinned host key.

The password lives only in memory, for step 2: it is never printed, logged, written or passed to
a child process (AUTODL_RUN_PASSWORD is removed from the environment once read).

Logging in again under the same name (after a power cycle changed the port or the password)
updates the profile in place; the host key pinned at the first login must still match, and jobs
submitted with `profile = "NAME"` follow the profile to its new port.
"""

from __future__ import annotations

import getpass
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from client.errors import AuthError, HostKeyError, SpecError
from client.instances import keys, profiles
from client.transport import hostkeys
from client.transport.errors_map import SshTarget
from client.transport.ssh import SshTransport, default_known_hosts
from jobs.spec import parse_ssh_command

PASSWORD_ENV = "AUTODL_RUN_PASSWORD"

# Reads the key from stdin and appends it to authorized_keys unless it is there (a file without a
# final newline gets one first). Prints `added` or `present`.
_INSTALL_KEY = r"""umask 077
k=$(cat)
mkdir -p ~/.ssh && chmod 700 ~/.ssh && touch ~/.ssh/authorized_keys || exit 3
if grep -qxF -- "$k" ~/.ssh/authorized_keys; then echo present; exit 0; fi
if [ -s ~/.ssh/authorized_keys ] && [ -n "$(tail -c 1 ~/.ssh/authorized_keys)" ]; then echo >> ~/.ssh/authorized_keys; fi
printf '%s\n' "$k" >> ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys && echo added
"""


@dataclass
class LoginResult:
    profile: profiles.Profile
    created: bool  # a new profile (else an existing one was updated)
    used_password: bool  # the key was refused and the password got us in
    key_added: bool  # the key was added to authorized_keys (else it was already there)
    host_key: str  # fingerprint of the pinned host key
    changes: dict[str, tuple[object, object]] = field(default_factory=dict)  # field -> (old, new)

    def as_dict(self) -> dict:
        return {
            "profile": self.profile.name,
            "where": self.profile.where,
            "created": self.created,
            "used_password": self.used_password,
            "key_added": self.key_added,
            "identity_file": self.profile.identity_file,
            "host_key": self.host_key,
            "changes": {k: {"old": o, "new": n} for k, (o, n) in self.changes.items()},
            "profiles_file": str(profiles.profiles_path()),
        }


@dataclass(frozen=True)
class TrustResult:
    target: str
    profile: str | None  # the profile whose pin was replaced (None: a host's entry in known_hosts)
    address: str  # host:port
    known_hosts: str  # the file the key is pinned in
    old: list[str]  # fingerprints pinned before
    new: str  # the fingerprint pinned now

    @property
    def changed(self) -> bool:
        return self.old != [self.new]

    def as_dict(self) -> dict:
        return {**asdict(self), "changed": self.changed}


def parse(command: str) -> tuple[str, int, str, str | None]:
    """(host, port, user, identity) from a pasted login command; a clear SpecError otherwise."""
    try:
        host, port, user, identity = parse_ssh_command(command.strip())
    except ValueError as exc:
        raise SpecError(
            f"cannot use the login command {command!r}: {exc}",
            [],
            hint='paste the command the console shows, in quotes: autodl-run login "ssh -p 38076 root@region-41.autodl.com"',
        ) from None
    return host, port, user or "root", identity


def password_source(prompt: str, *, env: str = PASSWORD_ENV) -> Callable[[], str]:
    """A callable asked at most once for the password: $AUTODL_RUN_PASSWORD (then removed), or a prompt."""

    def get() -> str:
        value = os.environ.pop(env, None)
        if value:
            return value
        if not sys.stdin.isatty():
            raise AuthError(
                "the instance needs the password once, to install the key, and there is no terminal to ask in",
                hint=f"set {env} for this command (it is read once, never stored), or run it in a terminal",
            )
        try:
            value = getpass.getpass(prompt)
        except (EOFError, KeyboardInterrupt):
            raise AuthError("no password given") from None
        if not value:
            raise AuthError("no password given", hint="copy the password from the instance's console")
        return value

    return get


def login(
    command: str,
    name: str | None = None,
    *,
    password: Callable[[], str] | None = None,
    connect_timeout: float = 15.0,
    log: Callable[[str], None] = lambda _msg: None,
) -> LoginResult:
    host, port, user, identity = parse(command)
    name = profiles.check_name(name or profiles.default_name(host))
    existing = profiles.load_all().get(name)
    key_path = Path(identity).expanduser() if identity else keys.ensure_key()
    if not key_path.is_file():
        raise AuthError(f"the key {key_path} given with -i does not exist", hint="check the path")
    public = keys.public_line(key_path)
    ask = password or password_source(
        f"password for {user}@{host} (from the console; used once, not stored): "
    )

    # A new profile pins its host key only once the login worked (a typo must not pin a stranger).
    with tempfile.TemporaryDirectory(prefix="autodl-run-login-") as tmp:
        known_hosts = profiles.hostkeys_path(name) if existing else Path(tmp) / "hostkeys"

        def transport(pw: Callable[[], str] | None) -> SshTransport:
            return SshTransport(
                host, port, user, identity_file=key_path, known_hosts=known_hosts,
                connect_timeout=connect_timeout, profile=name, host_key_alias=profiles.host_key_alias(name),
                password=pw,
            )  # fmt: skip

        try:
            with transport(ask) as t:
                res = t.run(["bash", "-c", _INSTALL_KEY], input=public + "\n")
                used_password, server_key = t.used_password, t.host_key()
        except HostKeyError as exc:
            exc.hint += (
                f". If {user}@{host}:{port} is another instance, give it a name of its own: "
                f'autodl-run login "{command.strip()}" --name OTHER'
            )
            raise
        key_added = res.stdout.strip().endswith("added")
        log(f"key {'added to' if key_added else 'already in'} ~/.ssh/authorized_keys on {user}@{host}:{port}")
        with transport(None) as t:  # the key alone must be enough from now on
            try:
                t.run(["true"])
            except AuthError as exc:
                raise AuthError(
                    f"{user}@{host}:{port} still refuses the key {key_path} after it was added to "
                    "~/.ssh/authorized_keys",
                    hint="its sshd may not read ~/.ssh/authorized_keys (AuthorizedKeysFile), or $HOME there "
                    "is writable by others (StrictModes): check /etc/ssh/sshd_config",
                ) from exc
        if not existing:
            hostkeys_file = profiles.hostkeys_path(name)
            hostkeys_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(known_hosts, hostkeys_file)

    profile = existing or profiles.Profile(name=name, host=host)
    changes: dict[str, tuple[object, object]] = {}
    for attr, value in (("host", host), ("port", port), ("user", user), ("identity_file", str(key_path))):
        if existing and getattr(existing, attr) != value:
            changes[attr] = (getattr(existing, attr), value)
        setattr(profile, attr, value)
    profile.login = command.strip()
    profile.updated_at = profiles.now()
    profiles.save(profile)
    fp = keys.fingerprint(server_key) if server_key is not None else ""
    if not fp:
        pinned = hostkeys.pinned(profile.known_hosts, profile.host_key_alias)
        fp = keys.fingerprint(pinned[0]) if pinned else ""
    return LoginResult(profile, existing is None, used_password, key_added, fp, changes)


def trust(target: str, port: int | None = None, *, connect_timeout: float = 15.0) -> TrustResult:
    """Re-pin the host key of a profile (`target` = its name) or of HOST[:--port], after showing both keys.

    The explicit step after a HostKeyError, when the instance is known to have been re-created.
    """
    saved = profiles.load_all()
    if target in saved and port is None:
        p = saved[target]
        file, name = p.known_hosts, p.host_key_alias
        t = SshTarget(
            p.host, p.port, p.user, None, file, connect_timeout, profile=p.name, host_key_alias=name
        )
    else:
        file = default_known_hosts()
        if port is None:
            ports = sorted({_port_of(n) for n in hostkeys.names_for_host(file, target)})
            if len(ports) > 1:
                raise HostKeyError(
                    f"{target} has keys pinned for several ports ({', '.join(map(str, ports))})",
                    hint=f"say which: autodl-run trust {target} --port PORT",
                )
            port = ports[0] if ports else 22
        t = SshTarget(target, port, "root", None, file, connect_timeout)
        name = t.known_hosts_name
    old = [keys.fingerprint(k) for k in hostkeys.pinned(file, name)]
    key = hostkeys.fetch(t)
    new = keys.fingerprint(key)
    hostkeys.pin(file, name, key)
    return TrustResult(target, t.profile, f"{t.host}:{t.port}", str(file), old, new)


def _port_of(name: str) -> int:
    if name.startswith("[") and "]:" in name:
        return int(name.rsplit(":", 1)[1])
    return 22
