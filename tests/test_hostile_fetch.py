"""A hostile instance cannot make `fetch` write, read or vouch for anything outside the adapter folder.

The instance is somebody else's machine: its listings, manifests and tools are data. Against the real
sshd, with lying tools first on the instance's PATH (a fake `rsync` that is "not found", so the client
falls back to SFTP; a `find` that lists `../../victim`; a `sha256sum` that lies about one file):
- traversal (`..` in a listing or a manifest entry), names with a newline, symlinks to laptop files and
  FIFOs never reach the laptop: the laptop file outside the download folder is untouched, fetch raises
  (the CLI exits non-zero), no acknowledgement is written, the adapter holds regular files only;
- a manifest entry naming a laptop file whose sha256 the instance guessed right gets no acknowledgement;
- a re-fetch cut midway leaves the copy verified before intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from jobfiles import cli

from client.errors import AutodlRunError, TransferError, VerifyError
from client.ledger import Ledger
from client.lifecycle import autofetch
from client.lifecycle.fetch import fetch, pull_verified
from client.transport.local import LocalTransport
from jobs import events as ev
from jobs.layout import RemoteLayout
from jobs.manifest import sha256_file, verify_manifest, write_manifest
from jobs.spec import JobSpec

pytestmark = pytest.mark.ssh
JOB = "j-hostile"
PRECIOUS = b"the laptop's own file\n"
REAL_FIND = shutil.which("find", path="/usr/bin:/bin")
REAL_SHA = shutil.which("sha256sum", path="/usr/bin:/bin")


@pytest.fixture(scope="module")
def server(sshd_factory):
    return sshd_factory()  # a server of our own: its home gets a PATH of lying tools


class Instance:
    """A job folder on the instance with a final adapter, a ledger record, and a laptop folder beside it."""

    def __init__(self, server, tmp_path: Path):
        self.server, self.tmp = server, tmp_path
        self.bin = server.home / "bin"
        self.paths = RemoteLayout(str(tmp_path / "instance")).job(JOB)
        self.adapter = Path(self.paths.adapter)
        self.adapter.mkdir(parents=True)
        (self.adapter / "adapter_config.json").write_text('{"r": 8}\n')
        (self.adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
        self.laptop = tmp_path / "laptop"
        self.dest = self.laptop / JOB / "adapter"
        self.victim = self.laptop / "victim"  # outside the download folder: ../../victim from adapter.partial
        self.laptop.mkdir()
        self.victim.write_bytes(PRECIOUS)
        # what the instance would plant there, at the same relative place on its side
        (Path(self.paths.dir) / "victim").write_bytes(b"PWNED\n")
        spec = JobSpec.model_validate(
            {"name": "hostile", "instance": {**server.instance().model_dump(), "remote_root": str(tmp_path / "instance")},
             "model": {"name_or_path": "/m"}, "data": {"train": "t.jsonl"}, "quant": {"bits": 16}}
        )  # fmt: skip
        self.ledger = Ledger()
        self.ledger.add(JOB, spec, tmp_path / "job.toml", "d" * 64, "b" * 64)
        self.record = self.ledger.get(JOB)

    def manifest(self) -> str:
        return write_manifest(self.adapter)

    def lie(self, tool: str, body: str) -> None:
        """A fake `tool` first on the instance's PATH (login shells and rsync's remote shell alike)."""
        path = self.bin / tool
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)

    def no_rsync(self) -> None:
        self.lie("rsync", "echo 'bash: rsync: command not found' >&2\nexit 127\n")

    def find_also_lists(self, extra: str) -> None:
        """`find` adds `extra` to every listing of files, in whatever form it is asked for."""
        self.lie(
            "find",
            f'{REAL_FIND} "$@"\nextra={json.dumps(extra)}\n'
            'case " $* " in *" -type f "*)\n'
            '  if [[ " $* " == *" -print0 "* ]]; then printf "%s\\0" "$extra"\n'
            f'  elif [[ " $* " == *" -exec "* ]]; then {REAL_SHA} -- "$extra"\n'
            '  else printf "%s\\n" "$extra"; fi;;\nesac\n',
        )

    def fetch(self):
        return fetch(self.record, self.ledger, self.laptop)

    @property
    def ack(self) -> Path:
        return Path(self.paths.fetched)

    def assert_nothing_escaped(self) -> None:
        assert self.victim.read_bytes() == PRECIOUS
        assert not self.ack.exists(), self.ack.read_text()
        outside = {p for p in self.laptop.rglob("*")} - {self.victim, self.laptop / "secret"}
        assert all(p.is_relative_to(self.laptop / JOB) for p in outside), outside
        self.assert_regular_only(self.laptop)

    @staticmethod
    def assert_regular_only(folder: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                mode = os.lstat(Path(dirpath) / name).st_mode
                assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), Path(dirpath) / name


@pytest.fixture
def inst(server, tmp_path: Path, autodl_home: Path):
    if not server.running:
        server.start()
    bin_dir = server.home / "bin"
    bin_dir.mkdir()
    for rc in (".bashrc", ".profile"):  # rsync's remote shell reads .bashrc, `bash -lc` reads .profile
        (server.home / rc).write_text(f'PATH="{bin_dir}:$PATH"\n')
    try:
        yield Instance(server, tmp_path)
    finally:
        shutil.rmtree(bin_dir)
        for rc in (".bashrc", ".profile"):
            (server.home / rc).unlink()


def use(inst: Instance, method: str) -> None:
    if method == "sftp":
        inst.no_rsync()


# -- paths from the listing ------------------------------------------------------------------------


def test_a_listing_with_traversal_is_refused_and_nothing_outside_is_written(inst: Instance) -> None:
    inst.manifest()
    inst.no_rsync()
    inst.find_also_lists("./../../victim")
    with pytest.raises(TransferError, match=r"\.\./\.\./victim.*leave|leave.*\.\./\.\./victim") as info:
        inst.fetch()
    assert "fetch again" in info.value.hint
    inst.assert_nothing_escaped()
    assert not inst.dest.exists()


def test_the_cli_exits_non_zero_and_never_says_verified(inst: Instance) -> None:
    inst.manifest()
    inst.no_rsync()
    inst.find_also_lists("./../../victim")
    res = cli("fetch", JOB, "--to", str(inst.laptop), check=False)
    assert res.returncode != 0 and "adapter verified" not in res.stdout, res.stdout + res.stderr
    assert "victim" in res.stdout + res.stderr
    inst.assert_nothing_escaped()


@pytest.mark.parametrize("method", ["sftp", "rsync"])
def test_a_name_with_a_newline_is_refused(inst: Instance, method: str) -> None:
    odd = inst.adapter / "sub\n..x" / "f.txt"  # a folder name with a newline, as the worker could write it
    odd.parent.mkdir()
    odd.write_text("odd\n")
    inst.manifest()
    use(inst, method)
    with pytest.raises((TransferError, VerifyError), match=r"sub\\\\n\.\.x|sub\\n\.\.x"):
        inst.fetch()
    inst.assert_nothing_escaped()
    assert not inst.dest.exists()


# -- what the manifest names -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sftp", "rsync"])
def test_a_manifest_entry_outside_the_folder_gets_no_ack_even_when_the_guess_is_right(
    inst: Instance, method: str
) -> None:
    write_manifest(inst.adapter)
    manifest = json.loads((inst.adapter / "manifest.json").read_text())
    # the instance guessed the laptop file's content right: verifying it would confirm the guess
    manifest["files"].append(
        {"path": "../../victim", "size": len(PRECIOUS), "sha256": hashlib.sha256(PRECIOUS).hexdigest()}
    )
    (inst.adapter / "manifest.json").write_text(json.dumps(manifest))
    use(inst, method)
    with pytest.raises(VerifyError, match=r"\.\./victim"):
        inst.fetch()
    inst.assert_nothing_escaped()
    assert not inst.dest.exists()


@pytest.mark.parametrize("method", ["sftp", "rsync"])
def test_a_symlink_to_a_laptop_file_never_lands_and_gets_no_ack(inst: Instance, method: str) -> None:
    secret = inst.laptop / "secret"
    secret.write_bytes(PRECIOUS)
    (inst.adapter / "link").symlink_to(secret)  # the manifest lists it with the laptop file's sha256
    inst.manifest()
    use(inst, method)
    with pytest.raises(VerifyError, match="link: missing"):
        inst.fetch()
    inst.assert_nothing_escaped()
    assert secret.read_bytes() == PRECIOUS and not inst.dest.exists()


@pytest.mark.parametrize("method", ["sftp", "rsync"])
def test_a_fifo_never_lands_in_the_verified_adapter(inst: Instance, method: str) -> None:
    os.mkfifo(inst.adapter / "pipe")
    digest = inst.manifest()
    use(inst, method)
    dest, got = inst.fetch()
    assert got == digest and verify_manifest(dest, digest) == digest
    Instance.assert_regular_only(inst.laptop)
    assert sorted(p.name for p in dest.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"
    ]  # fmt: skip
    assert json.loads(inst.ack.read_text()).keys() == {"what", "manifest_sha256", "step", "at"}


@pytest.mark.parametrize("method", ["sftp", "rsync"])
def test_the_instance_does_not_choose_the_modes_of_fetched_files(inst: Instance, method: str) -> None:
    risky = inst.adapter / "adapter_config.json"
    risky.chmod(0o6777)  # setuid, setgid, world-writable, executable
    inst.adapter.chmod(0o777)
    digest = inst.manifest()
    use(inst, method)
    dest, got = inst.fetch()
    assert got == digest
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == {0o644}


def test_anything_but_regular_files_in_the_copy_is_refused(inst: Instance, tmp_path: Path) -> None:
    """The last line of defence, whatever the transport copied (here rsync -a on this machine keeps links)."""
    (inst.adapter / "link").symlink_to(inst.victim)
    inst.manifest()
    with pytest.raises(VerifyError, match=r"'link' \(a symlink\)") as info:
        pull_verified(LocalTransport(), str(inst.adapter), inst.dest)
    assert "regular files" in info.value.hint
    assert not inst.dest.exists()
    Instance.assert_regular_only(inst.laptop)
    assert inst.victim.read_bytes() == PRECIOUS


# -- the background checkpoint fetch during `tail` --------------------------------------------------


def test_auto_fetch_refuses_traversal_too(inst: Instance, monkeypatch) -> None:
    monkeypatch.setattr(autofetch, "RETRY_S", 0.05)
    ckpt = Path(inst.paths.checkpoint(5)) / "adapter"
    shutil.copytree(inst.adapter, ckpt)
    digest = write_manifest(ckpt)
    inst.no_rsync()
    inst.find_also_lists("./../../../../victim")  # from checkpoints/step-5/adapter.partial to laptop/victim
    logged: list[str] = []
    fetcher = autofetch.AutoFetcher(inst.record, logged.append, inst.laptop)
    fetcher.offer(
        ev.Checkpoint(step=5, path=str(ckpt.parent), adapter_path=str(ckpt), adapter_manifest_sha256=digest)
    )
    assert fetcher.close(wait=True, timeout=300) is None
    assert any("could not fetch checkpoint step-5" in ln and "victim" in ln for ln in logged), logged
    inst.assert_nothing_escaped()


# -- an interrupted re-fetch -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sftp-lies-midway", "rsync-garbage"])
def test_an_interrupted_refetch_keeps_the_verified_copy(inst: Instance, how: str) -> None:
    first = inst.manifest()
    dest, _ = inst.fetch()
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    inst.ack.unlink()

    (inst.adapter / "adapter_config.json").write_text('{"r": 16}\n')  # a new adapter, same names
    weights = bytes(range(255, -1, -1)) * 40
    model = inst.adapter / "adapter_model.safetensors"
    was = model.stat().st_mtime
    model.write_bytes(weights)
    os.utime(model, (was, was))  # same size, same second: rsync's quick check alone would skip it
    second = inst.manifest()
    if how == "sftp-lies-midway":
        inst.no_rsync()  # the first file comes, then the second one's listed sha256 is a lie
        lie = hashlib.sha256(weights).hexdigest()
        inst.lie(
            "sha256sum", f'out=$({REAL_SHA} "$@") || exit $?\nprintf "%s\\n" "${{out//{lie}/{"0" * 64}}}"\n'
        )
    else:
        inst.lie("rsync", "echo 'not the rsync protocol'\nexit 1\n")
    with pytest.raises(AutodlRunError):
        inst.fetch()
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert verify_manifest(dest, first) == first
    assert not inst.ack.exists()

    for tool in inst.bin.iterdir():
        tool.unlink()
    dest, got = inst.fetch()  # the next fetch completes and swaps the new copy in
    assert got == second and verify_manifest(dest, second) == second
    assert not dest.with_name("adapter.partial").exists() and not dest.with_name("adapter.old").exists()
    assert sha256_file(dest / "adapter_model.safetensors") == hashlib.sha256(weights).hexdigest()


# -- found by the breaker --------------------------------------------------------------------------


def test_a_refused_refetch_cannot_change_the_modes_of_the_verified_copy(inst: Instance) -> None:
    """The re-fetch is seeded with hard links to the verified copy: rsync must not chmod their inodes."""
    first = inst.manifest()
    dest, _ = inst.fetch()
    cfg = dest / "adapter_config.json"
    inst.ack.unlink()
    (inst.adapter / "adapter_config.json").chmod(0o6777)  # same content, a mode of the instance's choosing
    (inst.adapter / "adapter_model.safetensors").write_bytes(b"not what the manifest says")
    with pytest.raises(AutodlRunError):
        inst.fetch()
    assert verify_manifest(dest, first) == first
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o644


def test_an_rsync_that_never_answers_cannot_hold_a_fetch(inst: Instance, monkeypatch) -> None:
    from client.transport import rsync

    monkeypatch.setattr(rsync, "IO_TIMEOUT_S", 1)
    inst.manifest()
    inst.lie("rsync", "exec sleep 120\n")  # rsync's far end: alive, keep-alives answered, silent (and gone soon)
    with pytest.raises(AutodlRunError):
        inst.fetch()  # rsync gives up after its I/O timeout (and its retries); a hang would hit no end
    assert not inst.ack.exists() and not inst.dest.exists()
