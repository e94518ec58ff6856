"""Shared fixtures.

- `_session_home` (autouse, session): $HOME in a folder of the session's, never the real user's.
- `autodl_home` (autouse): $AUTODL_RUN_HOME in a tmp folder; no ssh agent, not inside tmux.
- `local_home`: $HOME in a tmp folder of the test's own (for LocalTransport tests: `~` and the login shell).
- `sshd`: a real OpenSSH server on 127.0.0.1 (tests/sshd.py), one per session, restarted
  if a test killed it. Attributes: host, port, user, identity_file, host_key, authorized_keys,
  home (the sessions' $HOME, a tmp folder);
  `.instance(**overrides)` -> InstanceSpec; `.kill()` cuts every connection, `.start()` brings the
  same server back on the same port; `.log()`.
- `sshd_factory`: `sshd_factory()` starts another, independent server (stopped at session end).
- `ssh_transport`: an SshTransport to `sshd` pinning host keys in this test's known_hosts.
- `tmux_socket`: a `tmux -L` socket name of this test's own; its server is killed afterwards.

SSH tests are marked `@pytest.mark.ssh`; they skip, with the reason, where sshd, ssh,
ssh-keygen or rsync is missing (CI installs them, so there they run).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sshd import Sshd, missing_tools

# One thread per torch process (this one, and the workers it starts: they inherit it), before anything
# imports torch: the suite runs three pytest processes, each with training workers, on few cores, and more
# threads than cores made training many times slower. The sshd sessions get the same (tests/sshd.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from client.transport.ssh import SshTransport


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$HOME in a folder of this test session's, for every test: the login shells of the local target
    (`bash -lc`, one per command, a tail polls every second) never source the test machine's own
    ~/.profile, which may be slow (pyenv init: 1.3 s each here) or print; no test reads or writes the
    real user's ~/.ssh, ~/.cache or ~/autodl-tmp. `local_home` gives a test a home of its own."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def autodl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "autodl-home"
    home.mkdir()
    monkeypatch.setenv("AUTODL_RUN_HOME", str(home))
    for var in ("SSH_AUTH_SOCK", "TMUX", "TMUX_PANE"):
        monkeypatch.delenv(var, raising=False)
    return home


def _processes_under(folder: Path) -> list[int]:
    """Processes whose command line names a path inside `folder` (workers and guards a test started)."""
    me, found = os.getpid(), []
    mark = str(folder).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if mark in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture(autouse=True)
def _reap_jobs(tmp_path: Path) -> Iterator[None]:
    """A job a test launched (under tmux or setsid, so outside pytest's process tree) never outlives the
    test: it would train on for minutes and slow every test after it."""
    yield
    if not Path("/proc").is_dir():
        return
    for pid in _processes_under(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def local_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME in a tmp folder, so `~` and the login shell of LocalTransport stay inside the test.

    (Also keeps the test machine's own ~/.profile out: it may be slow, and a timeout test must
    not kill it half-way, e.g. while it holds a lock.)
    """
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(scope="session")
def sshd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Sshd]]:
    reason = missing_tools()
    started: list[Sshd] = []

    def start() -> Sshd:
        if reason:
            pytest.skip(reason)
        server = Sshd.create(tmp_path_factory.mktemp("sshd"))
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def _session_sshd(sshd_factory: Callable[[], Sshd]) -> Sshd:
    return sshd_factory()


@pytest.fixture
def sshd(_session_sshd: Sshd) -> Sshd:
    if not _session_sshd.running:  # an earlier test killed it
        _session_sshd.start()
    return _session_sshd


@pytest.fixture
def ssh_transport(sshd: Sshd, autodl_home: Path) -> Iterator[SshTransport]:
    t = SshTransport.from_instance(sshd.instance(), known_hosts=autodl_home / "known_hosts")
    t.backoff = 0.05  # rsync retries, fast in tests
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def tmux_socket() -> Iterator[str]:
    name = f"autodl-test-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        if shutil.which("tmux"):
            subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`tmpfs("1m")` mounts a small tmpfs: a disk that really fills up. Skips where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs-{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _durations() -> dict[str, float]:
    """tests/durations.txt: `seconds nodeid` lines (a nodeid without its parameters)."""
    found: dict[str, float] = {}
    for line in (Path(__file__).parent / "durations.txt").read_text().splitlines():
        seconds, _, nodeid = line.partition(" ")
        if line.strip() and not line.startswith("#"):
            found[nodeid.strip()] = float(seconds)
    return found


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest tests first (tests/durations.txt says which), the rest in their usual order: under
    `pytest -n 3` a process that is free takes the next test (see pytest_configure), so the long ones
    start early and the processes end together. The same order in every process (xdist needs it)."""
    seconds = _durations()
    took = [seconds.get(item.nodeid.split("[")[0], 0.0) for item in items]
    order = sorted(range(len(items)), key=lambda i: (-took[i], i))
    items[:] = [items[i] for i in order]


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist's `load` hands each process a quarter of the tests as one consecutive block to begin
    # with, so one process got every long test up front; one at a time, a free process takes the next
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1
