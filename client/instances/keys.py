"""The SSH key autodl-run logs in with: one ed25519 key pair of its own, under `$AUTODL_RUN_HOME/keys/`.

`autodl-run login` installs its public half into the instance's `~/.ssh/authorized_keys` (with the
password, once); from then on every command connects with this key alone. It has no passphrase
(the tool must connect unattended, e.g. to follow a job), so it lives in a 0700 folder as a 0600
file and is used for nothing else. A key given with `-i` in the login command is used instead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.errors import AuthError
from client.home import keys_dir

KEY_NAME = "id_ed25519"


def default_key_path() -> Path:
    return keys_dir() / KEY_NAME


def ensure_key(path: Path | None = None) -> Path:
    """The tool's private key, generated on first use (ed25519, no passphrase, 0600 in a 0700 folder)."""
    path = Path(path or default_key_path())
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    comment = f"autodl-run@{socket.gethostname() or 'laptop'}"
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.replace(tmp, path)
    path.with_name(path.name + ".pub").write_text(f"{public.decode()} {comment}\n")
    return path


def public_line(private_key: Path) -> str:
    """The authorized_keys line for a private key: its .pub file when there is one, else derived from it."""
    private_key = Path(private_key).expanduser()
    pub = private_key.with_name(private_key.name + ".pub")
    if pub.is_file():
        line = pub.read_text().strip()
        if line and len(line.split()) >= 2:
            return line
    try:
        key = paramiko.PKey.from_path(private_key)
    except paramiko.PasswordRequiredException:
        raise AuthError(
            f"the key {private_key} is protected by a passphrase and has no {pub.name} next to it",
            hint=f"write its public half next to it: ssh-keygen -y -f {private_key} > {pub}",
        ) from None
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise AuthError(f"cannot read the key {private_key}: {exc}", hint="check the -i path") from None
    return f"{key.get_name()} {key.get_base64()} autodl-run"


def fingerprint(key: paramiko.PKey) -> str:
    """`ED25519 SHA256:...`, the way `ssh-keygen -l` prints a key."""
    name = key.get_name().removeprefix("ssh-").split("-")[0].upper()
    return f"{name} {key.fingerprint}"
