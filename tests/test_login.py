"""`autodl-run login` / `trust` against an AutoDL-like instance in its own network namespace (tests/netns.py).

Its sshd lets root in with the password only, until login installs the tool's key.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import CLI, PASSWORD, Instance, _make_instance, _netns_ok, cli, login  # noqa: F401  (fixtures)

from client.errors import AuthError, HostKeyError
from client.instances import keys, profiles
from client.transport import connect
from client.transport.ssh import SshTransport
from jobs.spec import InstanceSpec

pytestmark = pytest.mark.ssh


def _accepted(inst: Instance, how: str) -> int:
    return inst.log().count(f"Accepted {how} for root")


def test_login_installs_the_key_and_later_commands_use_it_alone(make_instance, autodl_home: Path) -> None:
    inst = make_instance()
    # Before login the tool's key is refused: the instance knows only the password.
    t = SshTransport(inst.ip, inst.port, identity_file=keys.ensure_key(), known_hosts=autodl_home / "kh",
                     connect_timeout=30)  # fmt: skip
    with pytest.raises(AuthError):
        t.run(["true"])

    res = cli("login", inst.login_command(), "--name", "gpu1", "--json", password=PASSWORD)
    info = json.loads(res.stdout)
    assert info["created"] and info["used_password"] and info["key_added"]
    assert info["where"] == f"root@{inst.ip}:22" and info["host_key"].startswith("ED25519 SHA256:")
    assert _accepted(inst, "password") == 1
    authorized = (inst.root / ".ssh" / "authorized_keys").read_text()
    assert keys.public_line(keys.default_key_path()) in authorized
    assert (autodl_home / "keys" / "id_ed25519").stat().st_mode & 0o777 == 0o600

    # Every later command: the key alone, no password anywhere in the environment.
    with connect(InstanceSpec(profile="gpu1", connect_timeout=30)) as t:
        assert t.run("echo $HOME; command -v python3").stdout.split() == [
            "/root",
            "/root/miniconda3/bin/python3",
        ]
    assert _accepted(inst, "password") == 1 and _accepted(inst, "publickey") >= 2

    # Again, without a password: the key is already there, nothing is asked or added.
    again = json.loads(cli("login", inst.login_command(), "--name", "gpu1", "--json").stdout)
    assert not again["created"] and not again["used_password"] and not again["key_added"]
    assert authorized == (inst.root / ".ssh" / "authorized_keys").read_text()

    text = profiles.profiles_path().read_text()
    assert 'host = "' + inst.ip + '"' in text and "port = 22" in text
    assert PASSWORD not in text


def test_password_prompt_in_a_terminal(make_instance, autodl_home: Path) -> None:
    inst = make_instance()
    pid, fd = pty.fork()
    if pid == 0:  # the child: autodl-run login on a terminal of its own
        env = {k: v for k, v in os.environ.items() if k != "AUTODL_RUN_PASSWORD"}
        os.execve(sys.executable, [*CLI, "login", inst.login_command(), "--name", "tty"], env)
    out = b""
    deadline = time.monotonic() + 300  # a hang guard: the CLI's start, the connection, the prompt
    answered = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if not answered and b"password for root@" in out:
            os.write(fd, PASSWORD.encode() + b"\n")
            answered = True
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert answered and "tty" in text and "created" in text and "not stored" in text, text
    assert '[instance] profile = "tty"' in text
    assert PASSWORD not in text  # the terminal did not echo it


def test_wrong_password_saves_nothing(make_instance, autodl_home: Path) -> None:
    inst = make_instance()
    res = cli("login", inst.login_command(), "--name", "gpu1", password="not-the-password", check=False)
    assert res.returncode == 4, res.stderr
    assert "refused the password" in res.stderr and "not-the-password" not in res.stdout + res.stderr
    assert not profiles.profiles_path().exists() and not profiles.hostkeys_path("gpu1").exists()

    res = cli("login", inst.login_command(), "--name", "gpu1", check=False)  # no password, no terminal
    assert res.returncode == 4 and "AUTODL_RUN_PASSWORD" in res.stderr


@pytest.mark.parametrize(
    "command, message",
    [
        ("ssh -L 8080:localhost:80 root@region-41.autodl.com", "unsupported ssh option `-L`"),
        ("ssh -o StrictHostKeyChecking=no root@h", "only -o Port=N is understood"),
        ("scp -P 22 root@h:x .", 'must start with "ssh"'),
        ("ssh -p 22 root@h nvidia-smi", "no remote command"),
        ("ssh -p 99999 root@h", "bad port"),
    ],
)
def test_login_rejects_what_it_cannot_honour(command: str, message: str) -> None:
    res = cli("login", command, check=False)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "ssh -p 38076 root@region-41.autodl.com" in res.stderr  # the hint shows what to paste


def test_login_command_forms() -> None:
    from client.instances.login import parse

    assert parse("ssh -p 38076 root@region-41.autodl.com") == ("region-41.autodl.com", 38076, "root", None)
    assert parse("  ssh -p38076 -i ~/.ssh/k root@h ") == ("h", 38076, "root", "~/.ssh/k")
    assert parse("ssh -o Port=2222 h") == ("h", 2222, "root", None)
    assert profiles.default_name("region-41.autodl.com") == "region-41"
    assert profiles.default_name("connect.westb.seetacloud.com") == "connect-westb"
    assert profiles.default_name("10.0.0.7") == "10.0.0.7"


def test_changed_host_key_stops_every_command_until_trusted(make_instance, autodl_home: Path) -> None:
    inst = make_instance()
    login(inst)
    before = profiles.hostkeys_path("gpu1").read_text()
    inst.start(new_host_key=True)  # an instance re-created behind the same address, or an attacker

    res = cli("doctor", "gpu1", check=False)
    assert res.returncode == 4, res.stderr
    assert "host key of profile gpu1" in res.stderr and "changed" in res.stderr
    assert "autodl-run trust gpu1" in res.stderr and "intercepting" in res.stderr
    with pytest.raises(HostKeyError):
        connect(InstanceSpec(profile="gpu1", connect_timeout=30)).run(["true"])
    # ... and rsync's ssh, which reads the same pinned key through HostKeyAlias
    t = connect(InstanceSpec(profile="gpu1", connect_timeout=30))
    res = subprocess.run(t.ssh_command() + ["true"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 255 and "Host key verification failed" in res.stderr
    # a new login under the same name does not quietly accept the new key either
    res = cli("login", inst.login_command(), "--name", "gpu1", password=PASSWORD, check=False)
    assert res.returncode == 4 and "autodl-run trust gpu1" in res.stderr and "--name OTHER" in res.stderr
    assert profiles.hostkeys_path("gpu1").read_text() == before

    trusted = json.loads(cli("trust", "gpu1", "--json").stdout)
    assert trusted["changed"] and trusted["old"] != [trusted["new"]]
    with connect(InstanceSpec(profile="gpu1", connect_timeout=30)) as t:
        assert t.run(["echo", "ok"]).stdout == "ok\n"


def test_a_new_port_is_handled_by_logging_in_again(make_instance, autodl_home: Path) -> None:
    inst = make_instance()
    login(inst)
    inst.start(port=2222)  # a power cycle: same instance (same host key), another port
    res = cli("doctor", "gpu1", check=False)
    assert res.returncode == 4 and f"cannot reach {inst.ip} port 22" in res.stderr
    assert "--name gpu1" in res.stderr  # the hint says how to log in again

    info = json.loads(
        cli("login", inst.login_command(), "--name", "gpu1", "--json", password=PASSWORD).stdout
    )
    assert info["changes"] == {"port": {"old": 22, "new": 2222}} and not info["created"]
    assert not info["used_password"]  # the key survived the power cycle: no password needed
    assert profiles.get("gpu1").port == 2222
    with connect(InstanceSpec(profile="gpu1", connect_timeout=30)) as t:
        assert t.run(["true"]).ok


def test_trust_a_host_given_by_address(make_instance, autodl_home: Path, tmp_path: Path) -> None:
    """Instances given by host/port (no profile) pin keys under [host]:port; the error names `trust HOST --port`."""
    inst = make_instance()
    login(inst)  # authorizes the tool key; then reach the same instance by address
    spec = InstanceSpec(
        host=inst.ip, port=inst.port, identity_file=str(keys.default_key_path()), connect_timeout=30
    )
    with connect(spec) as t:
        t.run(["true"])
    inst.start(new_host_key=True)
    with pytest.raises(HostKeyError) as info:
        connect(spec).run(["true"])
    assert f"autodl-run trust {inst.ip}" in str(info.value)
    trusted = json.loads(cli("trust", inst.ip, "--json").stdout)
    assert trusted["changed"] and trusted["address"] == f"{inst.ip}:22"
    with connect(spec) as t:
        assert t.run(["true"]).ok


def test_profiles_file_round_trip(autodl_home: Path) -> None:
    from client.errors import AutodlRunError, TransportError

    p = profiles.Profile(name="a.b-1", host="region-41.autodl.com", port=38076, identity_file="/k/id",
                         login='ssh -p 38076 root@region-41.autodl.com')  # fmt: skip
    profiles.save(p)
    profiles.save(profiles.Profile(name="other", host="10.0.0.1"))
    assert profiles.load_all() == {"a.b-1": p, "other": profiles.get("other")}
    assert profiles.profiles_path().stat().st_mode & 0o777 == 0o600
    assert profiles.find(None).name in ("a.b-1", "other")
    with pytest.raises(AutodlRunError, match="bad profile name"):
        profiles.save(profiles.Profile(name="no spaces", host="h"))
    with pytest.raises(TransportError, match="no host.*a.b-1, other"):
        profiles.get("nope")
