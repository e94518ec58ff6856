"""The launcher against real tmux, setsid and processes, locally and (marked ssh) over a real sshd."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.errors import JobError
from client.remote import launcher
from client.transport import LocalTransport, SshTransport
from jobs.layout import JobPaths
from jobs.protocol import JobState

MODES = ["tmux", "setsid"]
NO_TMUX = "tmux is not installed (apt-get install tmux)"
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason=NO_TMUX)


def _need(mode: str) -> None:
    if mode == "tmux" and shutil.which("tmux") is None:
        pytest.skip(NO_TMUX)


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def transport(request: pytest.FixtureRequest, local_home: Path):
    if request.param == "local":
        return LocalTransport()
    return request.getfixturevalue("ssh_transport")


def _wait(transport, paths: JobPaths, timeout: float = 120.0) -> dict:  # a hang guard
    deadline = time.monotonic() + timeout
    while True:
        st = launcher.job_status(transport, paths)
        if st.state not in ("starting", "running") or time.monotonic() > deadline:  # starting: pid, no state yet
            return st
        time.sleep(0.05)


def _done(transport, paths: JobPaths) -> dict:
    st = _wait(transport, paths)
    assert st.state == "done", (st, _files(paths))
    return st


def _files(paths: JobPaths) -> dict[str, str]:
    d = Path(paths.dir)
    if not d.is_dir():
        return {}
    return {p.name: p.read_text(errors="replace")[-500:] for p in d.iterdir() if p.is_file()}


def _until(path: Path, timeout: float = 120.0) -> None:  # a hang guard
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _tmux_has(socket: str, session: str) -> bool:
    res = subprocess.run(["tmux", "-L", socket, "has-session", "-t", f"={session}"], capture_output=True)
    return res.returncode == 0


def _gone(pgid: int, timeout: float = 120.0) -> bool:  # a hang guard
    """No live process left in the group (zombies waiting for their parent to reap them don't count)."""
    deadline = time.monotonic() + timeout
    while _group(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _group(pgid: int) -> list[int]:
    live = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry))
    return live


@pytest.mark.parametrize("mode", MODES)
def test_launch_runs_to_done_and_records_everything(
    transport, tmp_path: Path, tmux_socket: str, mode: str
) -> None:
    _need(mode)
    paths = JobPaths(str(tmp_path / "jobs" / "job-1"))
    gate = Path(paths.dir) / "go"
    script = ('echo "out $GREETING"; echo err >&2; touch ready; while [ ! -e go ]; do sleep 0.02; done; '
              "echo finished")  # fmt: skip
    st = launcher.launch(
        transport, paths, ["sh", "-c", script], socket=tmux_socket, session="job-1",
        env={"GREETING": "it's \"quoted\" $HOME"}, prefer_tmux=mode == "tmux",
    )  # fmt: skip
    # starting: the wrapper wrote its pid (launch waits for that) but not yet `state`
    assert st.state in ("starting", "running") and st.alive and st.pid == int(Path(paths.pid).read_text())
    assert _tmux_has(tmux_socket, "job-1") == (mode == "tmux")
    _until(Path(paths.dir) / "ready")  # the command runs: the wrapper wrote `state` before it started it
    assert launcher.job_status(transport, paths, tmux_socket, "job-1").state == "running"
    gate.touch()
    st = _done(transport, paths)
    assert st == launcher.LaunchStatus(JobState.DONE, 0, False, st.pid)
    log = Path(paths.log).read_text()
    assert 'out it\'s "quoted" $HOME\n' in log and "err\n" in log and log.endswith("finished\n")
    assert Path(paths.exit_code).read_text() == "0\n" and Path(paths.state).read_text() == "done\n"
    assert (Path(paths.dir) / "run.sh").stat().st_mode & 0o777 == 0o600
    assert (Path(paths.dir) / ".path").read_text() == transport.run('printf %s "$PATH"').stdout
    assert not _tmux_has(tmux_socket, "job-1")  # the session vanished with its command


@pytest.mark.parametrize("mode", MODES)
def test_failing_command_keeps_its_exit_code(
    tmp_path: Path, tmux_socket: str, mode: str, local_home: Path
) -> None:
    _need(mode)
    transport = LocalTransport()
    paths = JobPaths(str(tmp_path / "job"))
    launcher.launch(transport, paths, ["sh", "-c", "echo boom >&2; exit 3"], socket=tmux_socket, session="j",
                    env={}, prefer_tmux=mode == "tmux")  # fmt: skip
    st = _wait(transport, paths)
    assert (st.state, st.exit_code, st.alive) == ("failed", 3, False)
    assert "boom" in Path(paths.log).read_text()


@pytest.mark.parametrize(
    "transport, mode",
    [
        ("local", "tmux"),
        ("local", "setsid"),
        pytest.param("ssh", "tmux", marks=pytest.mark.ssh),
    ],
    indirect=["transport"],
)
def test_cancel_interrupts_gracefully(transport, tmp_path: Path, tmux_socket: str, mode: str) -> None:
    _need(mode)
    paths = JobPaths(str(tmp_path / "job"))
    ready = Path(paths.dir) / "ready"
    # SIGINT must reach the worker (not ignored, as it would be for a plain `&` job): it traps it.
    script = 'trap "echo got-int; exit 5" INT; touch ready; while :; do sleep 0.05; done'
    st = launcher.launch(transport, paths, ["sh", "-c", script], socket=tmux_socket, session="c", env={},
                         prefer_tmux=mode == "tmux")  # fmt: skip
    _until(ready)
    # a grace no loaded machine outlasts: only a SIGINT that never arrives reaches the SIGTERM after it
    st = launcher.cancel(transport, paths, socket=tmux_socket, session="c", grace=60)
    # exit code 5 is the trap's: SIGINT reached it (the SIGTERM after the grace would give 143)
    assert (st.state, st.exit_code, st.alive) == ("cancelled", 5, False)
    assert "got-int" in Path(paths.log).read_text()
    assert _gone(st.pid) and not _tmux_has(tmux_socket, "c")


@pytest.fixture
def sigint_ignored_and_blocked() -> Iterator[None]:
    """This process ignores and blocks SIGINT, as one started by `cmd &` from a script ignores it:
    an ignore survives exec, and no shell can undo one it started with."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, old)


def _old_setsid(home: Path) -> None:
    """A login shell in `home` finds a setsid without -f (util-linux before 2.31): the launcher's
    background-job fallback."""
    real = shutil.which("setsid")
    if real is None:
        pytest.skip("setsid is not installed")
    fake = home / "old-setsid"
    fake.mkdir()
    (fake / "setsid").write_text(
        f'#!/bin/sh\ncase "$1" in -*) echo "setsid: invalid option -- $1" >&2; exit 1 ;; esac\nexec {real} "$@"\n'
    )
    (fake / "setsid").chmod(0o755)
    (home / ".profile").write_text(f'PATH="{fake}:$PATH"\n')


def _interrupted_by_cancel(t, paths: JobPaths, socket: str, prefer_tmux: bool) -> None:
    script = ('trap "echo got-int; exit 5" INT; touch ready; grep -E "^Sig(Ign|Blk)" /proc/self/status; '
              "while :; do sleep 0.05; done")  # fmt: skip
    launcher.launch(t, paths, ["sh", "-c", script], socket=socket, session="i", env={}, prefer_tmux=prefer_tmux)
    _until(Path(paths.dir) / "ready")
    st = launcher.cancel(t, paths, socket=socket, session="i", grace=60)
    log = Path(paths.log).read_text()
    assert (st.state, st.exit_code, st.alive) == ("cancelled", 5, False), log  # 143: SIGTERM after the grace
    assert "got-int" in log
    assert _gone(st.pid)


@pytest.mark.parametrize("mode", [*MODES, "old-setsid"])
def test_cancel_interrupts_a_job_launched_while_sigint_is_ignored(
    tmp_path: Path, tmux_socket: str, local_home: Path, mode: str, request: pytest.FixtureRequest
) -> None:
    _need(mode)
    if mode == "old-setsid":
        _old_setsid(local_home)
    request.getfixturevalue("sigint_ignored_and_blocked")
    _interrupted_by_cancel(LocalTransport(), JobPaths(str(tmp_path / "job")), tmux_socket, mode == "tmux")


@pytest.mark.ssh
def test_cancel_interrupts_a_job_of_an_old_setsid_over_ssh(
    sshd_factory, autodl_home: Path, tmp_path: Path, tmux_socket: str
) -> None:
    """Over SSH nothing is ignored to begin with: the fallback's own `&` made the job ignore SIGINT."""
    server = sshd_factory()  # a server of our own: its home gets the old setsid
    _old_setsid(server.home)
    with SshTransport.from_instance(server.instance(), known_hosts=autodl_home / "known_hosts") as t:
        _interrupted_by_cancel(t, JobPaths(str(tmp_path / "job")), tmux_socket, prefer_tmux=False)


def test_cancel_escalates_to_kill(tmp_path: Path, tmux_socket: str, local_home: Path) -> None:
    t = LocalTransport()
    paths = JobPaths(str(tmp_path / "job"))
    # ignores INT and TERM: only KILL stops it (the wrapper dies too, so cancel writes the exit code)
    script = "trap '' INT TERM; touch ready; while :; do sleep 0.05; done"
    launcher.launch(t, paths, ["sh", "-c", script], socket=tmux_socket, session="k", env={})
    _until(Path(paths.dir) / "ready")
    st = launcher.cancel(t, paths, socket=tmux_socket, session="k", grace=0.3)
    assert (st.state, st.exit_code, st.alive) == ("cancelled", 137, False)
    assert _gone(st.pid)


def test_cancel_of_a_finished_job_keeps_its_outcome(
    tmp_path: Path, tmux_socket: str, local_home: Path
) -> None:
    t = LocalTransport()
    paths = JobPaths(str(tmp_path / "job"))
    launcher.launch(t, paths, ["true"], socket=tmux_socket, session="f", env={})
    _done(t, paths)
    assert launcher.cancel(t, paths, socket=tmux_socket, session="f").state == "done"


def test_long_sleep_is_cancelled(tmp_path: Path, tmux_socket: str, local_home: Path) -> None:
    t = LocalTransport()
    paths = JobPaths(str(tmp_path / "job"))
    # `ready` once the shell runs: the SIGINT reaches the sleep, not a wrapper still starting up
    launcher.launch(t, paths, ["sh", "-c", "touch ready; exec sleep 300"], socket=tmux_socket, session="s", env={})
    _until(Path(paths.dir) / "ready")
    # a grace no loaded machine outlasts: only a SIGINT that never arrives reaches the SIGTERM after it
    st = launcher.cancel(t, paths, socket=tmux_socket, session="s", grace=60)
    assert (st.state, st.exit_code) == ("cancelled", 130)  # sleep died of SIGINT
    assert _gone(st.pid)


def test_quoting_of_paths_argv_and_env(tmp_path: Path, tmux_socket: str, local_home: Path) -> None:
    t = LocalTransport()
    job_dir = tmp_path / 'it\'s a "dir"' / "$(touch pwned) `id`"
    paths = JobPaths(str(job_dir))
    argv = ["sh", "-c", 'printf "%s|" "$@" "$V"', "_", "a b", "it's", "$(id)", "*"]
    launcher.launch(t, paths, argv, socket=tmux_socket, session="q", env={"V": "x'y\"z $(id)"})
    _done(t, paths)
    assert Path(paths.log).read_text() == "a b|it's|$(id)|*|x'y\"z $(id)|"
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


def test_job_dir_under_home(tmp_path: Path, tmux_socket: str, local_home: Path) -> None:
    t = LocalTransport()
    paths = JobPaths("~/autodl runs/job")
    launcher.launch(t, paths, ["sh", "-c", "pwd"], socket=tmux_socket, session="h", env={})
    _done(t, paths)
    log = local_home / "autodl runs" / "job" / "worker.log"
    assert log.read_text() == f"{local_home}/autodl runs/job\n"


@pytest.mark.parametrize(
    "socket, session",
    [("ok", "x; touch pwned"), ("ok", "$(touch pwned)"), ("ok", "-t"), ("ok", "a:b"), ("ok", ""),
     ("x y", "ok"), ("../evil", "ok")],
)  # fmt: skip
def test_bad_names_never_reach_a_shell(tmp_path: Path, socket: str, session: str) -> None:
    t = LocalTransport()
    paths = JobPaths(str(tmp_path / "job"))
    with pytest.raises(JobError, match="bad tmux"):
        launcher.launch(t, paths, ["true"], socket=socket, session=session, env={})
    with pytest.raises(JobError):
        launcher.cancel(t, paths, socket=socket, session=session)
    with pytest.raises(JobError, match="environment variable"):
        launcher.launch(t, paths, ["true"], socket="ok", session="ok", env={"A=1; touch pwned": "x"})
    assert not Path(paths.dir).exists() and not Path("pwned").exists()


@needs_tmux
def test_dotted_job_ids_are_fine_for_tmux(tmp_path: Path, tmux_socket: str, local_home: Path) -> None:
    t = LocalTransport()
    paths = JobPaths(str(tmp_path / "job"))
    launcher.launch(
        t, paths, ["sh", "-c", "touch ready; sleep 300"], socket=tmux_socket, session="qwen2.5-x", env={}
    )
    _until(Path(paths.dir) / "ready")
    assert _tmux_has(tmux_socket, "qwen2_5-x")
    assert launcher.cancel(t, paths, socket=tmux_socket, session="qwen2.5-x").state == "cancelled"


def test_status_missing_lost_and_double_launch(tmp_path: Path, tmux_socket: str, local_home: Path) -> None:
    t = LocalTransport()
    assert launcher.job_status(t, JobPaths(str(tmp_path / "nope"))).state == "missing"

    lost = tmp_path / "lost"
    lost.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (lost / "pid").write_text(f"{dead.pid}\n")
    (lost / "state").write_text("running\n")
    assert launcher.job_status(t, JobPaths(str(lost))) == launcher.LaunchStatus(JobState.LOST, None, False, dead.pid)

    # a live pid that is not this job's wrapper (e.g. reused after a reboot) is not "alive"
    (lost / "pid").write_text(f"{os.getpid()}\n")
    assert launcher.job_status(t, JobPaths(str(lost))).state == "lost"

    paths = JobPaths(str(tmp_path / "job"))
    launcher.launch(t, paths, ["sleep", "300"], socket=tmux_socket, session="d", env={})  # still running below
    with pytest.raises(JobError, match="already running"):
        launcher.launch(t, paths, ["true"], socket=tmux_socket, session="d2", env={})
    launcher.cancel(t, paths, socket=tmux_socket, session="d", grace=2)


@needs_tmux
def test_job_gets_the_launching_shells_path_even_from_an_old_tmux_server(
    tmp_path: Path, tmux_socket: str, local_home: Path
) -> None:
    t = LocalTransport()
    for n in (1, 2):  # the first launch starts the tmux server; the second reuses it
        (local_home / ".profile").write_text(f'PATH="$HOME/bin{n}:$PATH"\n')
        paths = JobPaths(str(tmp_path / f"job{n}"))
        launcher.launch(t, paths, ["sh", "-c", 'echo "$PATH"; touch ready; sleep 300'], socket=tmux_socket,
                        session=f"p{n}", env={})  # fmt: skip
        _until(Path(paths.dir) / "ready")
        assert Path(paths.log).read_text().startswith(f"{local_home}/bin{n}:")
    for n in (1, 2):
        launcher.cancel(t, JobPaths(str(tmp_path / f"job{n}")), socket=tmux_socket, session=f"p{n}", grace=2)


def test_wrapper_is_plain_posix_sh(tmp_path: Path) -> None:
    script = launcher._wrapper({"A": "1", "B": "x'y $(id)"}, ["true", "a b"])
    (tmp_path / "run.sh").write_text(script)
    assert subprocess.run(["sh", "-n", str(tmp_path / "run.sh")]).returncode == 0
    if subprocess.run(["which", "dash"], capture_output=True).returncode == 0:
        assert subprocess.run(["dash", "-n", str(tmp_path / "run.sh")]).returncode == 0


# Every character a shell, tmux (#{..} formats, #(command)) or a quote could take as code; the
# folder name itself is the marker: if any of it runs, `pwned` appears.
NASTY_DIR = 'it\'s a "dir"; $(touch pwned) `touch pwned` & | * ? \\ #(touch pwned) #{pane_id} ## -x'


@pytest.mark.parametrize("mode", MODES)
def test_nasty_job_dir_and_session_are_passed_as_values(
    transport, tmp_path: Path, tmux_socket: str, mode: str
) -> None:
    _need(mode)
    job_dir = tmp_path / NASTY_DIR / "-job $(touch pwned)"
    paths = JobPaths(str(job_dir))
    session = "0.5-a_b.c"  # what NAME_RE lets through: '.', '_', '-'
    st = launcher.launch(transport, paths, ["sh", "-c", 'pwd; echo "$1"; touch ready; sleep 300', "_", "$(id)"],
                         socket=tmux_socket, session=session, env={"V": "#(touch pwned)"},
                         prefer_tmux=mode == "tmux")  # fmt: skip
    assert st.state in ("starting", "running") and st.alive  # starting: the wrapper has not written `state` yet
    _until(job_dir / "ready")
    assert Path(paths.log).read_text() == f"{job_dir}\n$(id)\n"
    assert _tmux_has(tmux_socket, "0_5-a_b_c") == (mode == "tmux")
    assert launcher.job_status(transport, paths).state == "running"
    st = launcher.cancel(transport, paths, socket=tmux_socket, session=session, grace=5)
    assert (st.state, st.alive) == ("cancelled", False) and _gone(st.pid)
    assert not _tmux_has(tmux_socket, "0_5-a_b_c")
    assert launcher.job_status(transport, JobPaths(str(tmp_path / NASTY_DIR / "none"))).state == "missing"
    assert [p.name for p in (tmp_path / NASTY_DIR).iterdir()] == [job_dir.name]  # nothing else made
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


def test_nasty_job_dir_under_home(tmp_path: Path, tmux_socket: str, local_home: Path) -> None:
    t = LocalTransport()
    paths = JobPaths(f"~/{NASTY_DIR}/job")
    launcher.launch(t, paths, ["sh", "-c", "pwd"], socket=tmux_socket, session="h", env={})
    _done(t, paths)
    assert (local_home / NASTY_DIR / "job" / "worker.log").read_text() == f"{local_home}/{NASTY_DIR}/job\n"
    assert not list(tmp_path.rglob("pwned"))


def test_the_programs_are_the_package_scripts_whatever_the_values() -> None:
    """Values never go into the program text: the same job_control.sh runs for any folder or name."""
    from client.remote.bundle import script

    for d in ("/a", f"/{NASTY_DIR}", f"~/{NASTY_DIR}"):
        for argv in (launcher._control("status", d), launcher._control("cancel", d, "s", "n.x", 1, 2)):
            assert argv[:3] == ["bash", "-c", script("job_control.sh")] and d in argv[3:]
    wrapper = launcher._wrapper({"V": NASTY_DIR}, [NASTY_DIR])
    assert wrapper.endswith(script("job_wrapper.sh")) and NASTY_DIR not in script("job_wrapper.sh")


@pytest.mark.parametrize("what", ["fifo", "zero", "unicode"])
def test_the_job_files_are_data_a_fifo_or_a_flood_cannot_hang_status(
    tmp_path: Path, local_home: Path, what: str
) -> None:
    """Found by the breaker: a `pid` that is a FIFO hung every status look; `²` crashed it."""
    paths = JobPaths(str(tmp_path / "job"))
    Path(paths.dir).mkdir()
    if what == "fifo":
        os.mkfifo(paths.pid)
        os.mkfifo(paths.state)
    elif what == "zero":
        os.symlink("/dev/zero", paths.pid)
        os.symlink("/dev/zero", paths.exit_code)
    else:
        Path(paths.pid).write_text("²\n")
        Path(paths.exit_code).write_text("²\n")
    status = launcher.job_status(LocalTransport(), paths)  # a hang would hit the test's own timeout
    assert status.pid is None and status.exit_code is None and not status.alive
