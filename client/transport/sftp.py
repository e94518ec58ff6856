"""Files over SFTP, for an instance without rsync (or a laptop without it): the same results as rsync.

What `rsync -a --partial --mkpath [--delete]` gives, and how SFTP gives it here:
- a folder's contents land in the destination, missing parents are created (`mkdir -p`);
- only what differs is sent: one remote round trip lists every file with its sha256 first;
- each file is written under a temporary name and renamed into place, so a cut transfer
  never leaves a half file under the real name (a rerun sends what is still missing);
- modes and modification times are kept; `put` keeps symlinks as symlinks;
- `delete` removes what the source does not have;
- verification: afterwards every file is hashed again on the far side and compared with the
  source's sha256, as rsync checks each file it moves with a whole-file checksum.

`get` brings regular files and folders only (as rsync's `--no-links --no-devices --no-specials`):
the instance is somebody else's machine, so its listing is data. The listing is NUL-separated
(a name with a newline is one name, never two), and every name in it must pass
jobs.safepath.check_relpath (no `..`, not absolute, no control characters; a backslash is an
ordinary character on a POSIX laptop) and, on the laptop,
jobs.safepath.inside, before anything is opened or written; anything else is refused
(TransferError naming the file).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from client.errors import TransferError
from jobs.manifest import sha256_file, shown
from jobs.safepath import UnsafePathError, check_relpath, inside

if TYPE_CHECKING:
    from client.transport.ssh import SshTransport

PART = ".autodl-part"  # suffix of a file being written
POSIX = os.sep == "/" and os.altsep is None  # a backslash in a name is an ordinary character here

# Every record ends in NUL. Names come from `find -print0` (each starts with "./"); files are hashed
# one by one (`sha256sum -z` is too new for older images), as a HASH record then a NAME record.
_LIST = r"""
if [ -f "$1" ]; then h=$(sha256sum < "$1") || exit 1; printf '@@file\0%s\0' "${h%% *}"; exit 0; fi
cd -- "$1" 2>/dev/null || { printf '@@none\0'; exit 0; }
printf '@@dirs\0'; find . -mindepth 1 -type d -print0
printf '@@links\0'; find . -mindepth 1 -type l -print0
printf '@@files\0'
find . -type f -print0 | while IFS= read -r -d '' f; do
  h=$(sha256sum < "$f") || continue
  printf '%s\0%s\0' "${h%% *}" "$f"
done
"""
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass
class Listing:
    """What is at a path: nothing, one file, or a folder's dirs, symlinks and files (relative paths)."""

    kind: str  # "none" | "file" | "dir"
    dirs: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256


LIST_TIMEOUT_S = 1800.0  # hashing every file of a big checkpoint takes a while; a listing never ends never

def remote_listing(t: SshTransport, path: str) -> Listing:
    """What is at `path` on the instance; TransferError for a malformed listing or an unsafe name in it."""
    res = t.run(["bash", "-c", _LIST, "_", path], timeout=LIST_TIMEOUT_S)
    records = res.stdout.split("\0")
    if records and records[-1] == "":
        records.pop()  # what follows the last NUL
    listing, section, it = Listing("none"), "", iter(records)
    for rec in it:
        if rec.startswith("@@"):
            section = rec[2:]
            if section in ("file", "dirs"):
                listing.kind = "file" if section == "file" else "dir"
            if section == "file":
                listing.files[path] = _digest(next(it, ""), t, path)
            elif section not in ("none", "dirs", "links", "files"):
                raise _malformed(t, path, rec)
        elif section == "dirs":
            listing.dirs.add(_rel(rec, t, path))
        elif section == "links":
            listing.links.add(_rel(rec, t, path))
        elif section == "files":
            digest = _digest(rec, t, path)
            listing.files[_rel(next(it, ""), t, path)] = digest
        else:
            raise _malformed(t, path, rec)
    return listing


def local_listing(root: Path) -> Listing:
    if root.is_file():
        return Listing("file", files={str(root): sha256_file(root)})
    listing = Listing("dir")
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for d in list(dirnames):
            p = base / d
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                listing.links.add(rel)
                dirnames.remove(d)
            else:
                listing.dirs.add(rel)
        for name in filenames:
            p = base / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                listing.links.add(rel)
            else:
                listing.files[rel] = sha256_file(p)
    return listing


def put(t: SshTransport, local: Path, dest: str, *, delete: bool = False) -> None:
    """Send a file (to exactly `dest`) or a folder's contents (into `dest`), then verify."""
    if local.is_file():
        _put_file(t, local, dest)
        return
    mine = local_listing(local)
    theirs = remote_listing(t, dest)
    if theirs.kind == "file":
        t.run(["rm", "-f", "--", dest])
        theirs = Listing("none")
    t.run(["mkdir", "-p", "--", dest, *(posixpath.join(dest, d) for d in sorted(mine.dirs - theirs.dirs))])
    sent = 0
    with t.open_sftp() as client:
        for rel, digest in sorted(mine.files.items()):
            if theirs.files.get(rel) != digest:
                _send(client, local / rel, posixpath.join(dest, rel))
                sent += 1
        for rel in sorted(mine.links):
            remote = posixpath.join(dest, rel)
            _remove_quietly(client, remote)
            client.symlink(os.readlink(local / rel), remote)
    if delete:
        extra = [
            rel
            for rel in theirs.files.keys() | theirs.links
            if rel not in mine.files and rel not in mine.links
        ]
        extra += [d for d in theirs.dirs - mine.dirs if posixpath.dirname(d) in mine.dirs | {""}]
        if extra:
            t.run(["rm", "-rf", "--", *(posixpath.join(dest, rel) for rel in sorted(extra))])
    _verify(t, dest, mine, f"{local} -> {t.where}:{dest}")


def get(t: SshTransport, src: str, local: Path) -> None:
    """Fetch a file (to exactly `local`) or a folder's regular files and folders (into `local`), each verified.

    Symlinks, devices and FIFOs on the instance are not recreated; every name is checked first.
    """
    theirs = remote_listing(t, src)
    if theirs.kind == "none":
        raise TransferError(f"cannot fetch {t.where}:{src}: no such file or folder", hint="check the path")
    with t.open_sftp() as client:
        if theirs.kind == "file":
            _fetch(client, src, local, theirs.files[src])
            return
        local.mkdir(parents=True, exist_ok=True)
        for d in sorted(theirs.dirs):
            _local(local, d, t, src).mkdir(parents=True, exist_ok=True)
        for rel, digest in sorted(theirs.files.items()):
            target = _local(local, rel, t, src)
            if _regular(target) and sha256_file(target) == digest:
                continue
            _fetch(client, posixpath.join(src, rel), target, digest)


# -- one file -------------------------------------------------------------------------------------


def _put_file(t: SshTransport, local: Path, dest: str) -> None:
    digest = sha256_file(local)
    if remote_listing(t, dest).files.get(dest) == digest:
        return
    t.run(["mkdir", "-p", "--", posixpath.dirname(dest) or "/"])
    with t.open_sftp() as client:
        _send(client, local, dest)
    got = remote_listing(t, dest).files.get(dest)
    if got != digest:
        raise _mismatch(f"{local} -> {t.where}:{dest}", [posixpath.basename(dest)])


def _send(client, local: Path, remote: str) -> None:
    part = _part_name(remote)
    st = local.stat()
    try:
        client.put(str(local), part, confirm=True)  # confirm: the size is checked after the copy
        client.chmod(part, stat.S_IMODE(st.st_mode))
        client.utime(part, (st.st_atime, st.st_mtime))
        _rename(client, part, remote)
    except OSError as exc:
        _remove_quietly(client, part)
        raise TransferError(
            f"SFTP upload {local} -> {remote} failed: {exc}",
            hint="the disk there may be full (df -h); run the command again to send what is missing",
        ) from exc


def _fetch(client, remote: str, local: Path, digest: str) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(local.name + PART)
    try:
        client.get(remote, str(part))
        got = sha256_file(part)
        if got != digest:
            raise _mismatch(f"{remote} -> {local}", [local.name])
        os.replace(part, local)
    except OSError as exc:
        raise TransferError(f"SFTP download {remote} -> {local} failed: {exc}", hint="run it again") from exc
    finally:
        part.unlink(missing_ok=True)


def _verify(t: SshTransport, dest: str, mine: Listing, what: str) -> None:
    theirs = remote_listing(t, dest)
    bad = [rel for rel, digest in mine.files.items() if theirs.files.get(rel) != digest]
    if bad:
        raise _mismatch(what, bad)


def _mismatch(what: str, names: list[str]) -> TransferError:
    shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return TransferError(
        f"verification failed after the SFTP copy {what}: sha256 differs for {shown}",
        hint="the connection or a disk corrupted the copy: run the command again",
    )


def _part_name(remote: str) -> str:
    head, tail = posixpath.split(remote)
    return posixpath.join(head, f".{tail}{PART}")


def _rename(client, src: str, dst: str) -> None:
    try:
        client.posix_rename(src, dst)  # replaces dst atomically (OpenSSH's extension)
    except OSError:
        _remove_quietly(client, dst)
        client.rename(src, dst)


def _remove_quietly(client, path: str) -> None:
    try:
        client.remove(path)
    except OSError:
        pass


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _rel(name: str, t: SshTransport, src: str) -> str:
    """A name from the instance's `find`: `./REL`, with REL a safe relative path, else refused."""
    if not name.startswith("./"):
        raise _malformed(t, src, name)
    rel = name[2:]
    try:
        if "\ufffd" in rel:
            raise UnsafePathError(f"{shown(rel)!r}: not valid UTF-8")
        return check_relpath(rel, allow_backslash=POSIX)
    except UnsafePathError as exc:
        raise _unsafe(t, src, exc) from None


def _local(root: Path, rel: str, t: SshTransport, src: str) -> Path:
    try:
        return inside(root, rel, allow_backslash=POSIX)
    except UnsafePathError as exc:
        raise _unsafe(t, src, exc) from None


def _digest(value: str, t: SshTransport, src: str) -> str:
    if not _SHA.fullmatch(value):
        raise _malformed(t, src, value)
    return value


def _unsafe(t: SshTransport, src: str, exc: Exception) -> TransferError:
    return TransferError(
        f"refused a file name in the listing of {t.where}:{src}: {exc}; nothing was written for it",
        hint="the instance's folder holds a name that could leave the download folder (`..`, an absolute path, "
        "a newline or a control character): rename or remove it there, then fetch again",
    )


def _malformed(t: SshTransport, src: str, record: str) -> TransferError:
    return TransferError(
        f"the file listing of {t.where}:{src} is malformed near {shown(record[:80])!r}",
        hint="the instance's `find` or `sha256sum` printed something unexpected: check them there (`type find`)",
    )
