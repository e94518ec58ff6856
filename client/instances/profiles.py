"""Host profiles: how to reach an instance, saved by `autodl-run login`, named in a job as `[instance] profile`.

    $AUTODL_RUN_HOME/profiles.toml        one table per profile: host, port, user, identity_file, ...
    $AUTODL_RUN_HOME/hostkeys/NAME        the host key pinned for NAME (known_hosts format)

No secret is ever written here: the password is used once, by `login`, to install a key.

Host keys are pinned per profile, not per host:port. AutoDL instances share a few gateway host
names and their ports change on a power cycle, so a key filed under `[host]:port` would be trusted
anew after every restart. Filed under the profile's alias (`autodl-run.NAME`, which paramiko looks
up and `ssh -o HostKeyAlias=` uses for rsync), the key pinned at the first login is checked at
every later connection, whatever the port is now.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomllib

from client.errors import AutodlRunError, TransportError
from client.home import hostkeys_dir, profiles_file
from jobs import autodl
from jobs.spec import NAME_RE

_AUTODL_SUFFIXES = autodl.HOST_SUFFIXES


@dataclass
class Profile:
    name: str
    host: str
    port: int = 22
    user: str = "root"
    identity_file: str = ""
    login: str = ""  # the login command as pasted (it holds no secret)
    created_at: str = field(default_factory=lambda: now())
    updated_at: str = field(default_factory=lambda: now())

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def host_key_alias(self) -> str:
        return host_key_alias(self.name)

    @property
    def known_hosts(self) -> Path:
        return hostkeys_path(self.name)

    def as_dict(self) -> dict:
        return asdict(self) | {"where": self.where, "known_hosts": str(self.known_hosts)}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def profiles_path() -> Path:
    return profiles_file()


def hostkeys_path(name: str) -> Path:
    return hostkeys_dir() / check_name(name)


def host_key_alias(name: str) -> str:
    return f"autodl-run.{name}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise AutodlRunError(
            f"bad profile name {name!r}",
            hint="use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit",
        )
    return name


def default_name(host: str) -> str:
    """A profile name from the host: `region-41.autodl.com` -> `region-41`; an address stays as it is."""
    name = host.lower()
    for suffix in _AUTODL_SUFFIXES:
        if name.endswith(suffix) and name != suffix.lstrip("."):
            name = name[: -len(suffix)].replace(".", "-")
            break
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-._") or "instance"
    return name[:64]


def load_all() -> dict[str, Profile]:
    path = profiles_path()
    if not path.is_file():
        return {}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise AutodlRunError(f"{path} is not valid TOML: {exc}", hint="fix it, or log in again") from None
    known = set(Profile.__dataclass_fields__)
    out: dict[str, Profile] = {}
    for name, table in raw.items():
        if not isinstance(table, dict) or "host" not in table:
            continue
        fields = {k: v for k, v in table.items() if k in known and k != "name"}
        out[name] = Profile(name=name, **fields)
    return out


def get(name: str) -> Profile:
    profiles = load_all()
    if name not in profiles:
        names = ", ".join(sorted(profiles)) or "none yet"
        raise TransportError(
            f"profile {name} has no host to connect to: there is no such profile in {profiles_path()} "
            f"(profiles: {names})",
            hint='create it with `autodl-run login "ssh -p PORT root@HOST" --name ' + name + "`",
        )
    return profiles[name]


def find(name: str | None) -> Profile:
    """The named profile; without a name, the only one, or the one logged into last."""
    if name:
        return get(name)
    profiles = load_all()
    if not profiles:
        raise TransportError(
            "no host profiles yet", hint='log in first: autodl-run login "ssh -p PORT root@HOST"'
        )
    return max(profiles.values(), key=lambda p: p.updated_at)


def save(profile: Profile) -> Path:
    """Add or replace one profile; the file is rewritten whole, atomically (0600: it names hosts and keys)."""
    check_name(profile.name)
    profiles = load_all()
    profiles[profile.name] = profile
    path = profiles_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(_dumps(profiles))
    os.replace(tmp, path)
    return path


_HEADER = """\
# autodl-run host profiles, written by `autodl-run login`. Use one in a job as:
#   [instance]
#   profile = "NAME"
# No secrets here: the password is used once, to install the key, and never stored.
# Pinned host keys: hostkeys/NAME next to this file (`autodl-run trust NAME` re-pins one).
"""


def _dumps(profiles: dict[str, Profile]) -> str:
    parts = [_HEADER]
    for name in sorted(profiles):
        p = asdict(profiles[name])
        p.pop("name")
        parts.append(f"\n[{json.dumps(name)}]\n")
        for key, value in p.items():
            parts.append(f"{key} = {_toml(value)}\n")
    return "".join(parts)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string
