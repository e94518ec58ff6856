"""Setup on the instance, between sync and launch: the worker's packages, tmux, and the model.

`ensure_worker_deps` (the `setup` step of submit), one round trip when nothing is missing:
- finds the python (`instance.python`, through the login shell, so conda's counts) and which
  worker requirements (jobs.requirements) it lacks or has too old: `jobs/scripts/setup_probe.sh`
  runs `remote_worker.envprobe` from the worker bundle;
- installs those with pip, with the instance's torch pinned by a constraints file (a CUDA build
  that matches the driver is never replaced), from `instance.pip_index_url` when set, through
  `/etc/network_turbo` when `instance.network_turbo` (for that download only);
- leaves a marker keyed by the hash of the requirements and the python, so the next submit skips
  all of it: `{remote_root}/.setup/deps-HASH.json` (jobs.protocol.SetupMarker);
- without tmux, installs it with apt-get when it can (root, apt-get there), once; otherwise jobs
  run under `setsid nohup` (client.remote.launcher), with the same state and exit-code files.

The model download before launch is client.remote.prefetch.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from client import activity
from client.errors import RemoteEnvError, TransportError
from client.remote.bundle import script, sync_bundle
from client.transport.base import Result, Transport, sections
from client.transport.paths import shell_path
from jobs import autodl
from jobs.layout import APT_FAILED, RemoteLayout
from jobs.modelsource import uses_modelscope
from jobs.protocol import EnvProbe, ProtocolError, SetupMarker, dump_model, read_model
from jobs.requirements import requirements_for
from jobs.spec import AUTODL_DATA_DISK_ROOT, InstanceSpec, JobSpec

Log = Callable[[str], None]
NETWORK_TURBO = autodl.NETWORK_TURBO


def quiet(_message: str) -> None:
    """The default `log`: library code prints nothing of its own (the CLI passes client.views.log.printer)."""


# Where AutoDL images keep the python that has torch, when `python3` on PATH is another one.
PYTHON_CANDIDATES = ("/root/miniconda3/bin/python", "/root/anaconda3/bin/python", "/opt/conda/bin/python")
PIP_TIMEOUT_S = 1800
APT_TIMEOUT_S = 600
APT_LOCK_WAIT_S = 150  # per apt-get call; three calls at most stay within APT_TIMEOUT_S


@dataclass(frozen=True)
class Tools:
    """What the instance has besides python (one line of the set-up probe)."""

    tmux: bool
    rsync: bool
    apt: bool
    apt_failed: bool  # apt-get could not install tmux before: not tried again
    root: bool


@dataclass(frozen=True)
class WorkerEnv:
    """What set-up found: a fresh probe of the python, or the marker an earlier set-up left there."""

    found: EnvProbe | SetupMarker
    tools: Tools

    @property
    def from_marker(self) -> bool:
        return isinstance(self.found, SetupMarker)

    @property
    def python(self) -> str:
        return self.found.python

    @property
    def executable(self) -> str | None:
        return self.found.executable

    @property
    def torch(self) -> str | None:
        return self.found.torch

    @property
    def missing(self) -> list[str]:
        """Requirements the python lacks (none after a marker: it records a set-up that worked)."""
        return self.found.missing if isinstance(self.found, EnvProbe) else []

    @property
    def outdated(self) -> dict[str, str]:
        return self.found.outdated if isinstance(self.found, EnvProbe) else {}


# -- the worker's packages ------------------------------------------------------------------------


def remote_root(spec: JobSpec) -> str:
    return instance_root(spec.instance)


def instance_root(instance: InstanceSpec) -> str:
    """`instance.remote_root`, or where it defaults to (a local "instance": under this tool's home)."""
    if instance.remote_root:
        return instance.remote_root
    if instance.is_local:
        from client.home import local_root

        return str(local_root())
    return AUTODL_DATA_DISK_ROOT


def python_of(instance: InstanceSpec) -> str:
    """The interpreter on the instance (the spec's validator always sets it; this says so to the types)."""
    return instance.python or "python3"


def _setup_path(spec: JobSpec, *names: str) -> str:
    """`{remote_root}/.setup[/name]`: set-up's own files on the instance."""
    return RemoteLayout(remote_root(spec)).setup_file(*names)


def _marker_path(spec: JobSpec) -> str:
    return _setup_path(spec, f"deps-{deps_key(spec)}.json")


def _requirements(spec: JobSpec) -> dict[str, str]:
    m = spec.model
    return requirements_for(spec.quant.bits, modelscope=uses_modelscope(m.source, m.name_or_path, m.revision))


def deps_key(spec: JobSpec) -> str:
    """The marker's key: the requirements and the python that must satisfy them."""
    reqs = sorted(_requirements(spec).values())
    blob = json.dumps({"python": spec.instance.python, "requirements": reqs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def probe(transport: Transport, spec: JobSpec, bundle_dir: str, *, use_marker: bool = True) -> WorkerEnv:
    """Tools, and either the marker's record or a fresh probe of the python. One round trip.

    The probe is `remote_worker.envprobe`, run from the worker bundle at `bundle_dir`."""
    py = python_of(spec.instance)
    args = [
        _setup_path(spec, APT_FAILED), _marker_path(spec) if use_marker else "", py, bundle_dir,
        json.dumps(_requirements(spec)), *PYTHON_CANDIDATES,
    ]  # fmt: skip
    res = transport.run(
        ["bash", "-c", script("setup_probe.sh"), "setup-probe", *args], check=False, timeout=120
    )
    parts = sections(res.stdout)
    if "tools" not in parts:
        raise RemoteEnvError(f"the setup probe printed nothing on {transport.where}: {res.tail(3)}")
    t, r, a, f, uid = (parts["tools"][0].split() + ["0"] * 5)[:5]
    tools = Tools(tmux=t == "1", rsync=r == "1", apt=a == "1", apt_failed=f == "1", root=uid == "0")
    if "marker" in parts:
        where = f"{_marker_path(spec)} on {transport.where}"
        try:
            marker = read_model(SetupMarker, "\n".join(parts["marker"]), where)
        except ProtocolError:  # not ours, or cut short: check again
            return probe(transport, spec, bundle_dir, use_marker=False)
        return WorkerEnv(marker, tools)
    lines = [ln for ln in parts.get("probe", []) if ln.startswith("{")]
    if not res.ok or not lines:
        found = [c for c in parts.get("candidates", []) if c.strip()]
        hint = (
            f"set `instance.python` to the interpreter that has torch, e.g. {found[0]}"
            if found
            else f"set `instance.python` to the interpreter that has torch, e.g. {PYTHON_CANDIDATES[0]}"
        )
        raise RemoteEnvError(
            f"cannot run `{py}` on {transport.where} (exit {res.exited}): {res.tail(3)}", hint=hint
        )
    try:
        info = read_model(EnvProbe, lines[-1], f"the probe of `{py}` on {transport.where}")
    except ProtocolError as exc:
        raise RemoteEnvError(
            str(exc), hint="the worker bundle there may be from another autodl-run version"
        ) from None
    return WorkerEnv(info, tools)


def ensure_worker_deps(
    transport: Transport, spec: JobSpec, log: Log = quiet, *, bundle_dir: str | None = None
) -> WorkerEnv:
    """Make sure the worker can import what it needs; returns the probe (python, torch, tools).

    `bundle_dir`: the worker bundle on the instance (the probe runs from it); sent first when not given.
    """
    if bundle_dir is None:
        layout = RemoteLayout(remote_root(spec))
        bundle_dir = layout.bundle_dir(sync_bundle(transport, layout)[0])
    info = probe(transport, spec, bundle_dir)
    if info.from_marker:
        log("  packages checked before (a marker on the instance says so)")
    else:
        info = _install_missing(transport, spec, info, log, bundle_dir)
        _write_marker(transport, spec, info)
    if not spec.instance.is_local:
        _ensure_tmux(transport, spec, info.tools, log)
        if not info.tools.rsync:
            log("  no rsync on the instance: files go over SFTP (apt-get install -y rsync there is faster)")
    return info


def _install_missing(
    transport: Transport, spec: JobSpec, info: WorkerEnv, log: Log, bundle_dir: str
) -> WorkerEnv:
    py = spec.instance.python
    reqs = _requirements(spec)
    if "torch" in info.missing:
        raise RemoteEnvError(
            f"`{py}` on {transport.where} has no torch",
            hint="pick an instance image with PyTorch, or point `instance.python` at the python that has it",
        )
    if "torch" in info.outdated:
        raise RemoteEnvError(
            f"torch {info.outdated['torch']} on {transport.where} is older than the worker needs ({reqs['torch']})",
            hint="pick an image with a newer PyTorch; autodl-run never replaces the instance's torch, "
            "whose CUDA build has to match the driver",
        )
    need = info.missing + [m for m in info.outdated if m not in info.missing]
    if not need:
        return info
    if not info.torch:
        raise RemoteEnvError(
            f"cannot tell the version of torch in `{py}` on {transport.where}, so pip cannot be kept from replacing it",
            hint=f"install the missing packages yourself: {py} -m pip install {' '.join(reqs[m] for m in need)}",
        )
    if not spec.instance.install_deps and spec.model.source == "auto" and need == ["modelscope"]:
        log(
            "  no modelscope library on the instance: the model comes from Hugging Face (pip install modelscope there)"
        )
        return info
    wanted = [reqs[m] for m in need]
    if not spec.instance.install_deps:
        what = ", ".join(info.missing + [f"{m} (has {v})" for m, v in info.outdated.items()])
        raise RemoteEnvError(
            f"`{py}` on {transport.where} lacks: {what}",
            hint=f"run `{py} -m pip install {' '.join(wanted)}` there, or set `instance.install_deps = true`",
        )
    via = f" from {spec.instance.pip_index_url}" if spec.instance.pip_index_url else ""
    log(f"  installing on the instance{via}: {' '.join(wanted)} (torch {info.torch} pinned)")
    res = run_pip(transport, spec, pip_command(spec, info.torch, wanted))
    if not res.ok:
        raise RemoteEnvError(
            f"pip could not install {', '.join(need)} on {transport.where} (exit {res.exited}):\n"
            + "\n".join("  | " + ln for ln in res.tail(8).splitlines()),
            hint=_pip_hint(spec, res.stdout + res.stderr),
        )
    after = probe(transport, spec, bundle_dir, use_marker=False)
    still = after.missing + list(after.outdated)
    if still:
        raise RemoteEnvError(f"still missing after pip install on {transport.where}: {', '.join(still)}")
    return after


# pip's lines worth showing while it runs (the rest is noise: "Requirement already satisfied" by the dozen)
PIP_NEWS = re.compile(r"^\s*(Collecting|Downloading|Using cached|Building|Installing|Successfully|ERROR)")


def pip_news(log_tail: str) -> str:
    """pip's latest telling line, as the one line its progress is condensed into."""
    for line in reversed(log_tail.replace("\r", "\n").splitlines()):
        if PIP_NEWS.match(line):
            return " ".join(line.split())[:120]
    return ""


def run_pip(
    transport: Transport,
    spec: JobSpec,
    command: str,
    *,
    poll_s: float = 1.0,
    timeout_s: float = PIP_TIMEOUT_S,
) -> Result:
    """Run pip's `command` detached on the instance into a log there, polling the log: its latest line is
    reported as a client.activity Meter ("pip install on the instance"). Returns its result as a Result
    (exit code, the log's last lines)."""
    token = secrets.token_hex(4)
    log_file, rc_file = _setup_path(spec, f"pip-{token}.log"), _setup_path(spec, f"pip-{token}.rc")
    log_q, rc_q = shell_path(log_file), shell_path(rc_file)
    inner = f"bash -c {shlex.quote(command)} >{log_q} 2>&1; echo $? >{rc_q}.tmp && mv {rc_q}.tmp {rc_q}"
    transport.run(
        f"mkdir -p {shell_path(_setup_path(spec))} && (nohup bash -c {shlex.quote(inner)} </dev/null >/dev/null 2>&1 &)"
    )
    deadline = time.monotonic() + timeout_s
    with activity.meter("pip install on the instance") as m:
        while True:
            res = transport.run(f"echo @@rc; cat {rc_q} 2>/dev/null; echo @@log; tail -c 4000 {log_q} 2>/dev/null",
                                check=False)  # fmt: skip
            parts = sections(res.stdout)
            news = pip_news("\n".join(parts.get("log", [])))
            if news:
                m.update(note=news)
            rc = "".join(parts.get("rc", [])).strip()
            if rc.isdigit():
                break
            if time.monotonic() > deadline:
                raise RemoteEnvError(
                    f"pip did not finish in {timeout_s / 60:.0f} minutes on {transport.where}",
                    hint=f"see {log_file} there; a slow index: set instance.pip_index_url to a mirror",
                )
            time.sleep(poll_s)
        out = transport.run(f"tail -n 60 {log_q}; rm -f {log_q} {rc_q}", check=False).stdout
        m.end(ok=rc == "0")
    return Result.of(command, int(rc), out.encode(), b"")


def pip_command(spec: JobSpec, torch_version: str | None, wanted: list[str]) -> str:
    """pip install with torch pinned by a constraints file, the configured index, network_turbo if asked."""
    inst = spec.instance
    args = ["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-c", "$c"]
    if inst.pip_index_url:
        args += ["-i", inst.pip_index_url]
        url = urlparse(inst.pip_index_url)
        if url.scheme == "http" and url.hostname:
            args += ["--trusted-host", url.hostname]  # pip ignores a plain-http index otherwise
    quoted = " ".join('"$c"' if a == "$c" else shlex.quote(a) for a in args + wanted)
    pins = shlex.quote(f"torch=={torch_version}\n" if torch_version else "")
    return (
        "c=$(mktemp) || exit 1\ntrap 'rm -f \"$c\"' EXIT\n"
        f'printf %s {pins} > "$c"\n'
        + (turbo_prefix() if inst.network_turbo else "")
        + f"{shell_path(python_of(inst))} {quoted}"
    )


def turbo_prefix() -> str:
    """Source AutoDL's proxy for the command that follows (it runs in its own shell: nothing else sees it)."""
    return f"if [ -r {NETWORK_TURBO} ]; then . {NETWORK_TURBO} >/dev/null 2>&1; fi\n"


def _pip_hint(spec: JobSpec, output: str) -> str:
    if re.search(r"conflict|ResolutionImpossible|Cannot install", output):
        return (
            "a package needs another torch than the instance's (pinned, never replaced): pick an image with a "
            "newer PyTorch, or install a compatible version yourself"
        )
    if re.search(r"No space left", output):
        return "the system disk is full: pip's cache is in ~/.cache/pip (rm -rf ~/.cache/pip) — df -h /"
    if spec.instance.pip_index_url:
        return f"is {spec.instance.pip_index_url} reachable from the instance? `autodl-run doctor` checks it"
    return (
        "set `instance.pip_index_url` to a mirror the instance can reach, e.g. "
        f"{autodl.PIP_MIRROR} (or `network_turbo = true` on AutoDL)"
    )


def _write_marker(transport: Transport, spec: JobSpec, info: WorkerEnv) -> None:
    marker = SetupMarker(
        python=info.python, executable=info.executable, torch=info.torch,
        requirements=sorted(_requirements(spec).values()),
        checked_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )  # fmt: skip
    path = _marker_path(spec)
    transport.run(
        f"mkdir -p {shell_path(posixpath.dirname(path))} && cat > {shell_path(path)}",
        input=dump_model(marker),
    )


def _ensure_tmux(transport: Transport, spec: JobSpec, tools: Tools, log: Log) -> None:
    if tools.tmux:
        return
    fallback = "the job runs under setsid nohup instead (same state and exit-code files)"
    if not (tools.apt and tools.root):
        log(f"  no tmux on the instance and no apt-get as root to install it: {fallback}")
        return
    if tools.apt_failed:
        log(f"  no tmux (apt-get could not install it before): {fallback}")
        return
    log("  no tmux on the instance: apt-get install tmux")
    setup_dir = _setup_path(spec)
    apt_log = shell_path(_setup_path(spec, "apt.log"))
    apt = f"apt-get -o DPkg::Lock::Timeout={APT_LOCK_WAIT_S}"  # another apt holds the lock: wait, not fail
    cmd = (
        f"mkdir -p {shell_path(setup_dir)} && export DEBIAN_FRONTEND=noninteractive\n"
        f"{apt} install -y -q --no-install-recommends tmux >{apt_log} 2>&1 || "
        f"{{ {apt} update -q >>{apt_log} 2>&1 && "
        f"{apt} install -y -q --no-install-recommends tmux >>{apt_log} 2>&1; }}\n"
        f"rc=$?; tail -n 5 {apt_log}; command -v tmux >/dev/null 2>&1 || exit ${{rc:-1}}"
    )
    try:
        res = transport.run(cmd, check=False, timeout=APT_TIMEOUT_S)
    except TransportError as exc:  # a hung apt: give up on tmux, not on the job
        res = None
        log(f"  apt-get did not finish: {exc.message.splitlines()[0]}")
    if res is not None and res.ok:
        log("  tmux installed")
        return
    failed = _setup_path(spec, APT_FAILED)
    transport.run(f"mkdir -p {shell_path(setup_dir)} && date > {shell_path(failed)}", check=False)
    why = res.tail(1) if res is not None else "timed out"
    log(f"  apt-get could not install tmux ({why}): {fallback}")
