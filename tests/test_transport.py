"""Both transports against the real thing: bash, rsync, and (marked ssh) a real sshd on loopback."""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from sshd import keygen

from client.errors import AuthError, ConnectError, HostKeyError, RemoteCommandError, TransportError
from client.transport import LocalTransport, SshTransport, connect, shell_path
from client.transport import rsync as rs
from client.transport.errors_map import from_ssh_stderr
from client.transport.paths import expand_home
from jobs.spec import InstanceSpec

NASTY = ["plain.txt", "with space.txt", "it's.txt", 'dq"uote.txt', "$(touch pwned).txt", "-dash.txt"]


def _tree(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, name in enumerate(NASTY):
        (root / name).write_text(f"file {i}\n")
    (root / "sub dir" / "deeper").mkdir(parents=True)
    (root / "sub dir" / "deeper" / "x.bin").write_bytes(bytes(range(256)) * 100)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def transport(request: pytest.FixtureRequest, local_home: Path):
    if request.param == "local":
        return LocalTransport()
    return request.getfixturevalue("ssh_transport")


# -- commands -----------------------------------------------------------------------------------


def test_run_quotes_argv_and_uses_a_login_shell(transport, tmp_path: Path) -> None:
    args = ["a b", "it's", '"dq"', "$(touch pwned)", "`id`", "*", ";", "~/x"]
    res = transport.run(["printf", "%s\\n", *args])
    assert res.ok and res.stdout.splitlines() == args
    assert not transport.run(["test", "-e", "pwned"], check=False).ok  # in the remote working folder
    assert transport.run("shopt -q login_shell && echo login").stdout == "login\n"
    assert transport.run(["cat"], input="to stdin\n").stdout == "to stdin\n"
    assert transport.run("cat").stdout == ""  # no input: EOF at once, nothing hangs


def test_failure_shows_command_exit_code_and_stderr_tail(transport) -> None:
    script = "for i in $(seq 1 30); do echo err-line-$i >&2; done; exit 7"
    with pytest.raises(RemoteCommandError) as info:
        transport.run(["bash", "-c", script])
    err = info.value
    assert err.exited == 7 and "err-line-30" in err.stderr
    text = str(err)
    assert "exit code 7" in text and shlex.join(["bash", "-c", script]) in text and transport.where in text
    assert "err-line-30" in text and "err-line-21" in text and "err-line-20" not in text  # the last 10 lines
    res = transport.run(["bash", "-c", script], check=False)
    assert (res.ok, res.exited, res.tail(1)) == (False, 7, "err-line-30")


def test_signal_death_reports_128_plus_n(transport) -> None:
    res = transport.run(["bash", "-c", "kill -9 $$"], check=False)
    assert res.exited == 137


SIGNAL_STATE = "grep -E '^Sig(Ign|Blk):' /proc/self/status"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_commands_start_with_default_signals_whatever_this_process_ignores(transport) -> None:
    """Like sshd's sessions, a command starts with no signal ignored or blocked: an ignored SIGINT
    would pass through exec to a job launched through it, and cancel's SIGINT would never arrive."""
    sigs = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    seen = []
    try:
        seen.append(transport.run(SIGNAL_STATE).stdout)

        def other_thread() -> None:  # the mask is a thread's own
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
            seen.append(transport.run(SIGNAL_STATE).stdout)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    # signals 1-31 only: glibc reserves 32 and 33 for its threads, Python cannot reset them, and some
    # launchers start everything with 32 ignored (SigIgn 0x80000000 on a fresh-clone CI run)
    standard = (1 << 31) - 1
    states = [{line.split(":")[0]: int(line.split()[1], 16) & standard for line in out.splitlines()} for out in seen]
    assert states == [{"SigBlk": 0, "SigIgn": 0}] * 2, seen


def test_timeout(transport, tmp_path: Path) -> None:
    done = tmp_path / "done"  # the command runs until the test is over (over ssh, nothing kills it)
    t = time.monotonic()
    try:
        with pytest.raises(TransportError, match="timed out"):
            transport.run(f"while [ ! -e {shlex.quote(str(done))} ]; do sleep 0.1; done", timeout=0.5)
        # the 0.5 s timeout, not the command's end: the bound is far from both (a loaded machine is slow)
        assert time.monotonic() - t < 60
    finally:
        done.touch()


# -- files ----------------------------------------------------------------------------------------


def test_put_get_round_trip_of_a_folder(transport, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    remote = str(tmp_path / "remote side" / "new parent" / "dest")  # missing parents, a space
    transport.put(src, remote)
    assert _files(Path(remote)) == _files(src)
    transport.get(remote, tmp_path / "back" / "again")
    assert _files(tmp_path / "back" / "again") == _files(src)
    assert not list(tmp_path.rglob("pwned"))


def test_put_delete_and_single_files(transport, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    remote = tmp_path / "r"
    transport.put(src, str(remote))
    (src / "plain.txt").unlink()
    transport.put(src, str(remote) + "/", delete=True)
    assert not (remote / "plain.txt").exists() and (remote / "it's.txt").exists()

    one = tmp_path / "one file's name.txt"
    one.write_text("hello\n")
    transport.put(one, str(tmp_path / "a" / "b c" / "renamed.txt"))
    assert (tmp_path / "a" / "b c" / "renamed.txt").read_text() == "hello\n"
    transport.get(str(tmp_path / "a" / "b c" / "renamed.txt"), tmp_path / "x" / "y.txt")
    assert (tmp_path / "x" / "y.txt").read_text() == "hello\n"


def test_tilde_means_the_targets_home(transport, tmp_path: Path, local_home: Path, request) -> None:
    home = transport.run('printf %s "$HOME"').stdout
    if isinstance(transport, LocalTransport):
        assert home == str(local_home)
    else:
        assert home == str(request.getfixturevalue("sshd").home)
    name = f".autodl-run-test-{uuid.uuid4().hex[:8]}"
    try:
        assert transport.expand(f"~/{name}/f") == f"{home}/{name}/f"
        f = tmp_path / "f.txt"
        f.write_text("at home\n")
        transport.put(f, f"~/{name}/sub dir/f.txt")
        assert transport.run(f"cat {shell_path(f'~/{name}/sub dir/f.txt')}").stdout == "at home\n"
        assert transport.run(["cat", f"{home}/{name}/sub dir/f.txt"]).stdout == "at home\n"
        transport.get(f"~/{name}", tmp_path / "back")
        assert (tmp_path / "back" / "sub dir" / "f.txt").read_text() == "at home\n"
    finally:
        transport.run(["rm", "-rf", f"{home}/{name}"])


def test_shell_path_and_expand_home() -> None:
    assert shell_path("/a b/it's") == shlex.quote("/a b/it's")
    assert shell_path("~") == '"$HOME"'
    assert shell_path("~/a b") == "\"$HOME\"/'a b'"
    assert shell_path("~user/x") == "'~user/x'"
    assert expand_home("~/x/y", "/root/") == "/root/x/y"
    assert expand_home("~", "/home/me") == "/home/me"
    assert expand_home("/abs/~", "/home/me") == "/abs/~"


def test_local_without_rsync_copies_the_same(tmp_path: Path) -> None:
    t = LocalTransport(use_rsync=False)
    src = _tree(tmp_path / "src")
    t.put(src, str(tmp_path / "p" / "q"))
    t.get(str(tmp_path / "p" / "q"), tmp_path / "back")
    assert _files(tmp_path / "back") == _files(src)
    (src / "plain.txt").unlink()
    t.put(src, str(tmp_path / "p" / "q"), delete=True)
    assert _files(tmp_path / "p" / "q") == _files(src)


def test_ssh_stderr_mapping(tmp_path: Path) -> None:
    t = SshTransport("example.invalid", 2222, known_hosts=tmp_path / "kh").target
    cases = {
        "ssh: connect to host example.invalid port 2222: Connection refused": ConnectError,
        "ssh: Could not resolve hostname example.invalid: Name or service not known": ConnectError,
        "kex_exchange_identification: read: Connection reset by peer": ConnectError,
        "root@example.invalid: Permission denied (publickey).": AuthError,
        "Host key verification failed.": HostKeyError,
    }
    for line, kind in cases.items():
        assert type(from_ssh_stderr(f"noise\n{line}\nrsync: connection unexpectedly closed", t)) is kind, line
    # rsync's own permission problems are not authentication failures
    assert from_ssh_stderr('rsync: [receiver] mkstemp "/x/.f.abc" failed: Permission denied (13)', t) is None


def test_connect_picks_the_transport() -> None:
    assert isinstance(connect(InstanceSpec()), LocalTransport)
    t = connect(InstanceSpec(ssh="ssh -p 2222 root@example.invalid", connect_timeout=1))
    assert isinstance(t, SshTransport) and t.where == "root@example.invalid:2222"
    with pytest.raises(TransportError, match="no host"):
        connect(InstanceSpec(profile="saved-somewhere"))


# -- SSH only ------------------------------------------------------------------------------------


@pytest.mark.ssh
def test_ssh_pins_the_host_key_for_paramiko_and_rsync(
    ssh_transport, sshd, autodl_home: Path, tmp_path
) -> None:
    kh = autodl_home / "known_hosts"
    assert ssh_transport.run(["true"]).ok
    assert f"[{sshd.host}]:{sshd.port}" in kh.read_text()
    assert (kh.stat().st_mode & 0o777) == 0o600
    (tmp_path / "f").write_text("x")
    ssh_transport.put(tmp_path / "f", str(tmp_path / "g"))  # rsync's ssh trusts the same pinned key
    assert len(kh.read_text().splitlines()) == 1


@pytest.mark.ssh
def test_ssh_mkpath_fallback_makes_parents_itself(ssh_transport, tmp_path: Path) -> None:
    ssh_transport._mkpath = False  # as with an rsync older than 3.2.3 on one side
    src = _tree(tmp_path / "src")
    ssh_transport.put(src, str(tmp_path / "m" / "n"))
    ssh_transport.get(str(tmp_path / "m" / "n" / "sub dir"), tmp_path / "o" / "p")
    assert _files(tmp_path / "o" / "p") == _files(src / "sub dir")


@pytest.mark.ssh
def test_refused_port_is_a_connect_error(sshd, autodl_home: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = SshTransport.from_instance(sshd.instance(port=port, connect_timeout=120))
    start = time.monotonic()
    with pytest.raises(ConnectError) as info:
        t.run(["true"])
    # told at once, not after the 120 s connect timeout (at rest it takes milliseconds; the bound is
    # far from both, so a loaded machine does not fail it)
    assert time.monotonic() - start < 24
    assert f"127.0.0.1 port {port}" in str(info.value) and "refused" in str(info.value).lower()
    assert "hint:" in str(info.value)


@pytest.mark.ssh
def test_silent_port_times_out_within_the_connect_timeout(sshd) -> None:
    with socket.socket() as listener:  # accepts TCP, never says a word (a dead port forward)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        t = SshTransport.from_instance(sshd.instance(port=port, connect_timeout=1))
        start = time.monotonic()
        with pytest.raises(ConnectError) as info:
            t.run(["true"])
        elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 15, elapsed  # the 1 s timeout fired (never early); the bound only says it fired
    assert f"127.0.0.1 port {port}" in str(info.value) and "1 s connect timeout" in str(info.value)


@pytest.mark.ssh
def test_wrong_key_is_an_auth_error_naming_the_key(sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "not_authorized")
    t = SshTransport.from_instance(sshd.instance(identity_file=str(other)))
    with pytest.raises(AuthError) as info:
        t.run(["true"])
    assert str(other) in str(info.value) and "ssh-copy-id" in str(info.value)
    with pytest.raises(AuthError, match="does not exist"):
        SshTransport.from_instance(sshd.instance(identity_file=str(tmp_path / "nope"))).run(["true"])


@pytest.mark.ssh
def test_changed_host_key_is_refused_by_paramiko_and_by_rsync(
    sshd, tmp_path: Path, autodl_home: Path
) -> None:
    kh = autodl_home / "known_hosts"
    fake = keygen(tmp_path / "impostor")
    key_type, key_b64 = fake.with_suffix(".pub").read_text().split()[:2]
    kh.write_text(f"[{sshd.host}]:{sshd.port} {key_type} {key_b64}\n")
    t = SshTransport.from_instance(sshd.instance(), known_hosts=kh)
    with pytest.raises(HostKeyError) as info:
        t.run(["true"])
    text = str(info.value)
    assert str(kh) in text and f"autodl-run trust {sshd.host}" in text
    assert kh.read_text().count("\n") == 1  # nothing was re-pinned

    (tmp_path / "f").write_text("x")
    argv = rs.rsync_argv(
        str(tmp_path / "f"), f"{sshd.user}@{sshd.host}:{tmp_path / 'g'}", ssh=t.ssh_command()[:-1]
    )
    with pytest.raises(HostKeyError):
        rs.run_rsync(argv, where=t.where, attempts=1, classify=lambda err: from_ssh_stderr(err, t.target))
    assert not (tmp_path / "g").exists()


@pytest.mark.ssh
def test_rsync_ssh_errors_are_mapped(sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "not_authorized")
    t = SshTransport.from_instance(sshd.instance(identity_file=str(other)), known_hosts=tmp_path / "kh")
    (tmp_path / "f").write_text("x")
    argv = rs.rsync_argv(
        str(tmp_path / "f"), f"{sshd.user}@{sshd.host}:{tmp_path / 'g'}", ssh=t.ssh_command()[:-1]
    )
    with pytest.raises(AuthError, match="not_authorized"):
        rs.run_rsync(argv, where=t.where, attempts=3, backoff=0.01,
                     classify=lambda err: from_ssh_stderr(err, t.target))  # fmt: skip
    with pytest.raises(TransportError, match="exit code 23") as info:  # a missing source: not retried
        rs.run_rsync(
            rs.rsync_argv(str(tmp_path / "missing"), str(tmp_path / "z")), where="local", backoff=0.01
        )
    assert "source does not exist" in str(info.value)


@pytest.mark.ssh
def test_rsync_retries_a_dropped_link_with_backoff(sshd, tmp_path: Path) -> None:
    with socket.socket() as s:  # nobody listens here: ssh fails with 255, a transient failure
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = SshTransport.from_instance(sshd.instance(port=port), known_hosts=tmp_path / "kh")
    (tmp_path / "f").write_text("x")
    argv = rs.rsync_argv(
        str(tmp_path / "f"), f"{sshd.user}@{sshd.host}:{tmp_path / 'g'}", ssh=t.ssh_command()[:-1]
    )
    start = time.monotonic()
    with pytest.raises(ConnectError, match=f"port {port}"):
        rs.run_rsync(argv, where=t.where, attempts=3, backoff=0.2,
                     classify=lambda err: from_ssh_stderr(err, t.target))  # fmt: skip
    assert time.monotonic() - start >= 0.6  # slept 0.2 s, then 0.4 s, between the three attempts


@pytest.mark.ssh
def test_reconnects_after_the_server_comes_back(ssh_transport, sshd) -> None:
    assert ssh_transport.run(["echo", "1"]).stdout == "1\n"
    sshd.kill()
    with pytest.raises(ConnectError):
        ssh_transport.run(["echo", "2"])
    sshd.start()
    assert ssh_transport.run(["echo", "3"]).stdout == "3\n"  # the same transport, a new connection


@pytest.mark.ssh
def test_connection_cut_mid_command_is_a_connect_error(ssh_transport, sshd, tmp_path: Path) -> None:
    assert ssh_transport.run(["true"]).ok
    errors: list[BaseException] = []
    running = tmp_path / "running"  # the test sshd runs on this machine: the command's marker is seen here
    marker = shlex.quote(str(running))

    def long_command() -> None:  # runs until the test removes its marker (the cut does not end it)
        try:
            ssh_transport.run(f"touch {marker} && while [ -e {marker} ]; do sleep 0.1; done")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    th = threading.Thread(target=long_command)
    th.start()
    deadline = time.monotonic() + 120  # a hang guard
    while not running.exists():  # the command runs on the server: the cut lands mid-command
        assert th.is_alive() and time.monotonic() < deadline, errors
        time.sleep(0.02)
    start = time.monotonic()
    try:
        sshd.kill()
        th.join(timeout=120)  # a hang guard
        elapsed = time.monotonic() - start
    finally:
        running.unlink(missing_ok=True)  # the command ends
    # noticed at once (the connection closed), not by the keepalive (15 s x 4 = 60 s) nor by the
    # command's end (never, here): the bound is far from both
    assert not th.is_alive() and elapsed < 30
    assert len(errors) == 1 and isinstance(errors[0], ConnectError), errors
    assert "lost the connection" in str(errors[0])
    sshd.start()
    assert ssh_transport.run(["echo", "ok"]).stdout == "ok\n"


@pytest.mark.ssh
def test_ssh_command_is_usable_by_hand(ssh_transport) -> None:
    ssh_transport.run(["true"])  # pin the key first
    res = subprocess.run(
        ssh_transport.ssh_command() + ["echo", "hi"], capture_output=True, text=True, timeout=120
    )
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
