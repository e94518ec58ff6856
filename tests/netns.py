"""A "remote host" for the tests: an AutoDL-like instance in its own network namespace, on this machine.

    laptop (the test process)  10.231.A.B+1 --veth-- 10.231.A.B+2  instance (netns `adrt-PID-N`)

The instance is an OpenSSH server started inside that network namespace and inside a mount
namespace of its own (`ip netns exec NS unshare -m ...`), where a few bind mounts make it look
like a fresh AutoDL container without touching this machine:

- /etc is a copy of this machine's /etc without its shadow files; /etc/shadow holds only a
  throwaway root password (the machine's own root password is never read or changed), and
  /etc/network_turbo exists when asked for;
- /root is a folder of the test's: `.profile` puts a fake conda (`/root/miniconda3/bin`, whose
  python is the test's python) on PATH for login shells only, as AutoDL images do, and PATH is a
  folder of symlinks to /usr/bin that leaves out what the instance should lack (tmux, rsync);
- /root/autodl-tmp is the data disk (a small tmpfs when a size is given), /root/autodl-fs exists;
- /usr/bin/apt-get is a stand-in that records what it was asked and fails, as apt does offline.

sshd allows only root, with the password, as AutoDL does (no key is authorized at first). The
addresses are on a veth pair this module creates (10.231.x.y/30), so traffic never leaves the
machine. Everything is removed in `stop()`: the processes in the namespace, the veth pair, the
namespace. A namespace left by a test process that died is removed by the next run.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sshd import SSHD, keygen, openssh_version

PREFIX = "adrt-"
PASSWORD = "throwaway-Pa55-for-tests"  # a test password, for a test sshd in a test mount namespace
_counter = itertools.count()


def _passthrough() -> list[Path]:
    """The folders right under /root that the test's python needs (e.g. /root/.pyenv), if any."""
    found = set()
    for p in (Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable)):
        real = p.resolve()
        if real.parts[:2] == ("/", "root") and len(real.parts) > 2:
            found.add(Path("/root", real.parts[2]))
    return sorted(found)


def missing() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "mount", "openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed"
    name = f"{PREFIX}probe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` is not permitted here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def cleanup_stale() -> None:
    """Remove namespaces (and their veths) left by test processes that no longer exist."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _kill_netns_processes(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _kill_netns_processes(name: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _free_subnet() -> tuple[str, str]:
    used = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    for _ in range(200):
        a, b = random.randrange(256), random.randrange(0, 256, 4)
        if f"10.231.{a}.{b + 1}/" not in used:
            return f"10.231.{a}.{b + 1}", f"10.231.{a}.{b + 2}"
    raise RuntimeError("no free 10.231.x.y/30 subnet")


@dataclass
class Instance:
    dir: Path
    hide: tuple[str, ...] = ()
    data_disk: str | None = None  # a tmpfs size such as "64m"; None: a plain folder
    port: int = 22
    ns: str = ""
    veth: str = ""
    laptop_ip: str = ""
    ip: str = ""
    proc: subprocess.Popen | None = None
    _started: list[str] = field(default_factory=list)

    # -- what the tests look at ----------------------------------------------------------------

    @property
    def root(self) -> Path:
        """What the instance sees as /root (its data disk under it, unless that is a tmpfs)."""
        return self.dir / "root"

    @property
    def apt_log(self) -> Path:
        return self.dir / "apt-get.log"

    @property
    def python_log(self) -> Path:
        """One line per run of the instance's (conda) python: `http_proxy|argv`."""
        return self.dir / "python.log"

    @property
    def log_path(self) -> Path:
        return self.dir / "sshd.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def login_command(self) -> str:
        return f"ssh -p {self.port} root@{self.ip}"

    # -- setting it up ---------------------------------------------------------------------------

    @classmethod
    def create(cls, parent: Path, **options: object) -> Instance:
        d = parent / f"instance-{os.getpid()}-{next(_counter)}"
        d.mkdir(mode=0o700, parents=True)
        inst = cls(d, **options)  # type: ignore[arg-type]
        inst._make_files()
        return inst

    def _make_files(self) -> None:
        d = self.dir
        keygen(d / "host_ed25519")
        # /etc without this machine's shadow files; our own shadow with the throwaway password
        shutil.copytree(
            "/etc",
            d / "etc",
            symlinks=True,
            ignore=shutil.ignore_patterns("shadow", "shadow-", "gshadow", "gshadow-"),
        )
        digest = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"], input=PASSWORD, capture_output=True, text=True, check=True
        ).stdout.strip()
        users = [ln.split(":")[0] for ln in (d / "etc" / "passwd").read_text().splitlines() if ln]
        shadow = [f"root:{digest}:19000:0:99999:7:::"] + [
            f"{u}:*:19000:0:99999:7:::" for u in users if u != "root"
        ]
        (d / "etc" / "shadow").write_text("\n".join(shadow) + "\n")
        os.chmod(d / "etc" / "shadow", 0o640)
        # /root: a fake conda on PATH for login shells, PATH without what the instance lacks
        root = self.root
        root.mkdir()
        for src in _passthrough():  # the test's python lives there: mounted through
            (root / src.name).mkdir()
        (root / "autodl-tmp").mkdir()
        (root / "autodl-fs").mkdir()
        conda = root / "miniconda3" / "bin"
        conda.mkdir(parents=True)
        (root / "miniconda3" / "conda-meta").mkdir()
        wrapper = (
            "#!/bin/sh\n"
            f'printf \'%s|%s %s\\n\' "${{http_proxy:-}}" "$1" "$(printf %s "$2" | head -n 1 | cut -c1-60)" >> {self.python_log}\n'
            f'exec {sys.executable} "$@"\n'
        )
        for name in ("python", "python3"):
            (conda / name).write_text(wrapper)
            (conda / name).chmod(0o755)
        farm = root / ".bin"
        farm.mkdir()
        for src in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
            for entry in sorted(os.listdir(src)):
                if entry in self.hide or (farm / entry).exists() or (farm / entry).is_symlink():
                    continue
                (farm / entry).symlink_to(os.path.join(src, entry))
        (root / ".profile").write_text(
            "# as on an AutoDL image: conda's python only in login shells\n"
            "export PATH=/root/miniconda3/bin:/root/miniconda3/condabin:/root/.bin\n"
            "export CONDA_PREFIX=/root/miniconda3 CONDA_DEFAULT_ENV=base\n"
        )
        (root / ".bashrc").write_text("# non-login shells (rsync's, scp's) get sshd's PATH\n")
        apt = d / "apt-get"
        apt.write_text(  # as apt-get behaves offline
            f'#!/bin/sh\necho "$*" >> {self.apt_log}\n'
            'case "$1" in update) echo "W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease'
            "  Temporary failure resolving 'deb.debian.org'\" >&2;;\n"
            '  *) echo "E: Unable to locate package tmux" >&2;; esac\nexit 100\n'
        )
        apt.chmod(0o755)

    def set_network_turbo(self, proxy: str) -> None:
        """Give the instance an /etc/network_turbo that sets `proxy` as its http(s) proxy, as AutoDL's does."""
        (self.dir / "etc" / "network_turbo").write_text(
            "# AutoDL's academic proxy, as a test stand-in\n"
            f"export http_proxy={proxy} https_proxy={proxy}\n"
            'echo "设置成功"\n'
        )

    def start(self, port: int | None = None, new_host_key: bool = False) -> Instance:
        """Start sshd (again): on another port, or with a new host key (a re-created instance)."""
        if self.proc is not None:
            self.stop_sshd()
        if port is not None:
            self.port = port
        if new_host_key:
            for f in ("host_ed25519", "host_ed25519.pub"):
                (self.dir / f).unlink()
            keygen(self.dir / "host_ed25519")
        if not self.ns:
            self._network()
        mounts = [
            f"mount --bind {self.dir / 'etc'} /etc",
            *(f"mount --bind {src} {self.root / src.name}" for src in _passthrough()),
            f"mount -t tmpfs -o size={self.data_disk} tmpfs {self.root / 'autodl-tmp'}"
            if self.data_disk
            else "true",
            f"mount --rbind {self.root} /root",
            f"mount --bind {self.dir / 'apt-get'} /usr/bin/apt-get"
            if Path("/usr/bin/apt-get").exists()
            else "true",
            f"exec {' '.join(self.sshd_argv())}",
        ]
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private",
             "sh", "-ec", " && ".join(mounts)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 120  # a hang guard: a loaded machine starts sshd slowly
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd in {self.ns} exited with {self.proc.returncode}:\n{self.log()}")
            if self._banner():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"sshd in {self.ns} did not answer within 120 s:\n{self.log()}")

    def sshd_argv(self) -> list[str]:
        opts = [
            f"HostKey={self.dir / 'host_ed25519'}",
            f"Port={self.port}",
            f"ListenAddress={self.ip}",
            "UsePAM=no",  # the password is checked against /etc/shadow (our throwaway copy)
            "PermitRootLogin=yes",
            "AllowUsers=root",
            "PasswordAuthentication=yes",
            "PubkeyAuthentication=yes",  # on, as on AutoDL; no key is authorized until login adds one
            "KbdInteractiveAuthentication=no",
            "StrictModes=no",  # /root is a pytest tmp folder
            "PidFile=none",
            "Subsystem=sftp internal-sftp",
            "LogLevel=VERBOSE",  # logs each subsystem request (the SFTP fallback test looks for it)
            f"SetEnv=PATH={'/root/.bin'}",  # non-login sessions (rsync's): without what is hidden
        ]
        if openssh_version() >= (9, 8):
            opts.append("PerSourcePenalties=no")
        return [SSHD, "-D", "-e", "-f", "/dev/null"] + [f"-o '{o}'" for o in opts]

    def _network(self) -> None:
        n = next(_counter)
        self.ns = f"{PREFIX}{os.getpid()}-{n}"
        self.veth = f"adrt{os.getpid() % 100000}x{n}"[:15]
        peer = self.veth[:-1] + "p" if len(self.veth) == 15 else self.veth + "p"
        self.laptop_ip, self.ip = _free_subnet()
        for argv in (
            ["ip", "netns", "add", self.ns],
            ["ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer],
            ["ip", "link", "set", peer, "netns", self.ns],
            ["ip", "addr", "add", f"{self.laptop_ip}/30", "dev", self.veth],
            ["ip", "link", "set", self.veth, "up"],
            ["ip", "-n", self.ns, "addr", "add", f"{self.ip}/30", "dev", peer],
            ["ip", "-n", self.ns, "link", "set", peer, "up"],
            ["ip", "-n", self.ns, "link", "set", "lo", "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.ip, self.port), timeout=1) as s:
                return s.recv(64).startswith(b"SSH-2.0-OpenSSH_")
        except OSError:
            return False

    # -- tearing it down -------------------------------------------------------------------------

    def stop_sshd(self) -> None:
        """Stop sshd and every connection (jobs it started keep running, as on an instance)."""
        if self.proc is None:
            return
        from sshd import _sshd_only, descendants

        pids = [self.proc.pid] + _sshd_only(descendants(self.proc.pid))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Everything in the namespace, the veth pair and the namespace itself."""
        self.stop_sshd()
        if self.ns:
            _kill_netns_processes(self.ns)
            subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
            self.ns = ""


# -- HTTP stand-ins the instance reaches over the veth: a pip index, a Hugging Face hub, a proxy ------


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list[str]  # set per server class: "METHOD path", in order

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _note(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")

    def _send(
        self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, length: int | None = None
    ) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@dataclass
class Server:
    """A threaded HTTP server on `host`, stopped by `stop()`; `requests` lists what it was asked."""

    httpd: http.server.ThreadingHTTPServer
    handler: type[_Quiet]

    @classmethod
    def start(cls, host: str, handler: type[_Quiet]) -> Server:
        handler = type(handler.__name__, (handler,), {"requests": []})
        httpd = http.server.ThreadingHTTPServer((host, 0), handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return cls(httpd, handler)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[str]:
        return self.handler.requests

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def pip_index(host: str, folder: Path) -> Server:
    """A PEP 503 "simple" index: `folder/NAME/NAME-VERSION-py3-none-any.whl` (a directory listing is enough)."""

    class Index(_Quiet):
        def do_GET(self) -> None:
            self._note()
            rel = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")
            if rel.startswith("simple"):
                rel = rel[len("simple") :].lstrip("/")
            path = folder / rel
            if path.is_dir():
                links = "".join(f'<a href="{p.name}">{p.name}</a>\n' for p in sorted(path.iterdir()))
                self._send(
                    200, f"<html><body>\n{links}</body></html>".encode(), {"Content-Type": "text/html"}
                )
            elif path.is_file():
                self._send(200, path.read_bytes(), {"Content-Type": "application/octet-stream"})
            else:
                self._send(404, b"not found")

        do_HEAD = do_GET

    return Server.start(host, Index)


def build_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel: module `name` with `__version__`, and its metadata."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    files = {
        f"{module}/__init__.py": f'__version__ = "{version}"\n',
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: autodl-run-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n"
    out = folder / name / f"{dist}-py3-none-any.whl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return out


def hub(
    host: str, repos: dict[str, Path], claimed_sizes: dict[str, int] | None = None,
    hold: threading.Event | None = None,
) -> Server:
    """The slice of the Hugging Face hub API that snapshot_download uses, serving local folders.

    claimed_sizes: file sizes the API reports instead of the real ones (a model too big for the disk).
    hold: each weights file trickles until it is set, then comes whole (a download that is surely
    still going when the test cuts the connection).
    """
    sha = "0123456789abcdef0123456789abcdef01234567"

    class Hub(_Quiet):
        def do_GET(self) -> None:
            self._note()
            path = urllib.parse.unquote(self.path.split("?")[0])
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo = "/".join(parts[2:4])
                if repo not in repos:
                    self._send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                    return
                files = {
                    f.name: (claimed_sizes or {}).get(f.name, f.stat().st_size)
                    for f in sorted(repos[repo].iterdir())
                    if f.is_file()
                }
                if parts[4:5] == ["tree"]:  # list_repo_tree (newer huggingface_hub)
                    tree = [{"type": "file", "path": f, "size": n, "oid": hashlib.sha1(f.encode()).hexdigest()}
                            for f, n in files.items()]  # fmt: skip
                    self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                    return
                siblings = [{"rfilename": f, "size": n} for f, n in files.items()]
                body = json.dumps(
                    {"id": repo, "modelId": repo, "sha": sha, "siblings": siblings, "private": False}
                )
                self._send(200, body.encode(), {"Content-Type": "application/json"})
                return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                f = repos.get(repo, Path("/nonexistent")) / filename
                if not f.is_file():
                    self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"})
                    return
                data = f.read_bytes()
                etag = hashlib.sha256(data).hexdigest()
                headers = {
                    "X-Repo-Commit": sha,
                    "ETag": f'"{etag}"',
                    "Content-Type": "application/octet-stream",
                }
                if hold is not None and self.command == "GET" and f.suffix == ".safetensors":
                    self._send(200, b"", headers, length=len(data))
                    sent = 0  # a byte every 0.5 s until `hold` is set (huggingface_hub gives up after 10 s
                    while not hold.wait(0.5) and sent < len(data) - 1:  # without one), then the rest
                        self.wfile.write(data[sent : sent + 1])
                        sent += 1
                    self.wfile.write(data[sent:])
                    return
                self._send(200, data, headers)
                return
            self._send(404, b"not found")

        do_HEAD = do_GET

    return Server.start(host, Hub)


def proxy(host: str) -> Server:
    """A forward HTTP proxy (absolute-URI requests), as /etc/network_turbo points at; it records each request."""

    class Proxy(_Quiet):
        def do_GET(self) -> None:
            self._note()
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            req = urllib.request.Request(self.path, method=self.command)
            for k in ("Range", "Accept", "User-Agent", "Accept-Encoding"):
                if self.headers.get(k):
                    req.add_header(k, self.headers[k])
            try:
                with opener.open(req, timeout=30) as resp:
                    code, headers, body = resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as exc:
                code, headers, body = exc.code, dict(exc.headers), exc.read()
            except OSError as exc:
                code, headers, body = 502, {}, str(exc).encode()
            length = int(headers.get("Content-Length", len(body))) if self.command == "HEAD" else None
            drop = ("content-length", "connection", "transfer-encoding")
            self._send(code, body, {k: v for k, v in headers.items() if k.lower() not in drop}, length)

        do_HEAD = do_GET

    return Server.start(host, Proxy)


# -- fixtures and helpers (import them into a test module: `from netns import make_instance, ...`) ---

CLI = [sys.executable, "-m", "client.cli"]


# Fixture functions carry a name of their own, so a test module imports them without shadowing its arguments:
#     from netns import fixtures  # noqa: F401  (make_instance, serve)


@pytest.fixture(scope="session", name="netns_ok")
def _netns_ok() -> None:
    reason = missing()
    if reason:
        pytest.skip(reason)
    cleanup_stale()


@pytest.fixture(name="make_instance")
def _make_instance(tmp_path: Path, netns_ok: None) -> Iterator[Callable[..., Instance]]:
    """make_instance(hide=("tmux",), data_disk="64m") -> a started Instance, removed afterwards."""
    made: list[Instance] = []

    def make(**options: object) -> Instance:
        inst = Instance.create(tmp_path, **options)
        made.append(inst)
        return inst.start()

    try:
        yield make
    finally:
        for inst in made:
            inst.stop()


@pytest.fixture(name="serve")
def _serve() -> Iterator[Callable[[Server], Server]]:
    """serve(netns.hub(...)) keeps a server until the test ends."""
    servers: list[Server] = []

    def keep(server: Server) -> Server:
        servers.append(server)
        return server

    try:
        yield keep
    finally:
        for s in servers:
            s.stop()


fixtures = (_netns_ok, _make_instance, _serve)


def cli(*args: str, password: str | None = None, check: bool = True, timeout: float = 300,
        **env: str) -> subprocess.CompletedProcess:  # fmt: skip
    """Run `autodl-run ARGS` as a user would, stdin not a terminal; AUTODL_RUN_PASSWORD only when given."""
    environ = {k: v for k, v in os.environ.items() if k != "AUTODL_RUN_PASSWORD"} | env
    if password is not None:
        environ["AUTODL_RUN_PASSWORD"] = password
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=environ,
                         stdin=subprocess.DEVNULL)  # fmt: skip
    if check and res.returncode != 0:
        raise AssertionError(f"autodl-run {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def login(inst: Instance, name: str = "gpu1") -> object:
    """Log in through the library (the password given in memory), for tests about what comes after."""
    from client.instances.login import login as do_login

    return do_login(inst.login_command(), name, password=lambda: PASSWORD, connect_timeout=30)
