"""`autodl-run doctor [PROFILE | JOB.toml] [--json]`: is this instance ready to train? One round trip.

The worker bundle goes first (unless the instance has it: content-addressed), then a single remote
script (`jobs/scripts/doctor.sh`) prints, in sections: the clock, the OS, the python the login
shell finds (conda's included) and what it has (`remote_worker.envprobe`, run from the bundle:
torch, CUDA, the worker's packages), the GPUs and the driver (nvidia-smi), free space and inodes of the system disk, the data disk and
/root/autodl-fs, tmux and rsync, and whether the pip index and the Hugging Face endpoint answer
(each with a short timeout, in parallel, and again through /etc/network_turbo when it exists).
`checks()` turns that into rows of ok / warn / fail, each failure with the fix. `doctor()` returns a
`DoctorReport`; client.views.doctor draws the table, `--json` prints `report.as_dict()`. A job file says which python, index and endpoint to
check; a profile alone checks what the instance itself is configured with.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from client.errors import AutodlRunError
from client.instances import profiles
from client.remote.bundle import script, sync_bundle
from client.remote.setup import NETWORK_TURBO, PYTHON_CANDIDATES, instance_root
from client.transport import connect
from client.transport.base import Transport, sections
from jobs import autodl
from jobs.layout import RemoteLayout
from jobs.protocol import EnvProbe, ProtocolError, read_model
from jobs.requirements import QLORA_REQUIREMENTS, WORKER_REQUIREMENTS
from jobs.spec import LOCAL_HOST, InstanceSpec

NET_TIMEOUT_S = 5
DATA_DISK = autodl.DATA_DISK
AUTODL_FS = autodl.FS
GB = 1e9
MIRRORS = {
    "pip": autodl.PIP_MIRROR,
    "hf": autodl.HF_MIRROR,
}


Status = Literal["ok", "warn", "fail", "info"]


class Check(BaseModel):
    name: str
    status: Status
    detail: str
    hint: str = ""


class OsInfo(BaseModel):
    name: str | None = None
    kernel: str | None = None


class PythonInfo(BaseModel):
    path: str | None = None  # what the login shell finds
    version: str | None = None
    executable: str | None = None
    probe_error: str | None = None
    conda: bool = False
    conda_prefix: str | None = None
    conda_env: str | None = None
    candidates: list[str] = Field(default_factory=list)  # pythons where AutoDL images keep torch


class TorchInfo(BaseModel):
    version: str | None = None
    cuda: str | None = None
    cuda_available: bool = False
    error: str | None = None


class Gpu(BaseModel):
    name: str
    memory_mib: int
    memory_used_mib: int


class GpuInfo(BaseModel):
    count: int = 0
    gpus: list[Gpu] = Field(default_factory=list)
    driver: str | None = None
    torch_gpus: list[dict[str, Any]] = Field(default_factory=list)


class Disk(BaseModel):
    total_bytes: int
    free_bytes: int
    mount: str
    inodes_total: int | None = None
    inodes_free: int | None = None


class Tool(BaseModel):
    path: str | None = None
    version: str | None = None


class Reach(BaseModel):
    """One HTTP request from the instance."""

    http_code: int = 0
    seconds: float | None = None
    reachable: bool = False


class Endpoint(BaseModel):
    url: str | None = None
    http_code: int = 0
    seconds: float | None = None
    reachable: bool = False
    through_turbo: Reach | None = None  # the same request through /etc/network_turbo, when it exists


class Clock(BaseModel):
    skew_s: float | None = None  # the instance's clock minus this machine's
    round_trip_s: float = 0.0


class BundleInfo(BaseModel):
    dir: str | None = None
    error: str | None = None


class Findings(BaseModel):
    """What the remote script found (`parse`), and whether the worker bundle got there."""

    os: OsInfo = Field(default_factory=OsInfo)
    python: PythonInfo = Field(default_factory=PythonInfo)
    torch: TorchInfo = Field(default_factory=TorchInfo)
    gpu: GpuInfo = Field(default_factory=GpuInfo)
    packages: dict[str, str | None] = Field(default_factory=dict)
    flash_attn: bool = False
    disks: dict[str, Disk] = Field(default_factory=dict)
    tools: dict[str, Tool] = Field(default_factory=dict)
    network_turbo_available: bool = False
    pip_index: Endpoint = Field(default_factory=Endpoint)
    hf_endpoint: Endpoint = Field(default_factory=Endpoint)
    clock: Clock = Field(default_factory=Clock)
    bundle: BundleInfo = Field(default_factory=BundleInfo)


class DoctorReport(Findings):
    """`autodl-run doctor`: the findings, which instance, and the checks made of them."""

    target: str
    where: str
    python_setting: str
    network_turbo_setting: bool
    checks: list[Check]
    ok: bool

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def as_dict(self) -> dict[str, Any]:
        """The `--json` form (its keys are the interface: scripts read them)."""
        return self.model_dump(mode="json")


def resolve_target(target: str | None) -> tuple[str, InstanceSpec]:
    """(a label, the instance) for a profile name, a job.toml, or nothing (the last profile logged into)."""
    if target and (target.endswith(".toml") or Path(target).is_file()):
        from client.specfile import load_spec

        return target, load_spec(target).instance
    if target == LOCAL_HOST:
        return target, InstanceSpec(host=LOCAL_HOST)
    known = profiles.load_all()
    if not known or (target and target not in known):
        from client.errors import SpecError

        what = f"no saved host named {target}" if target else "no host to check: none is saved yet"
        names = ", ".join(sorted(known)) or "none yet"
        raise SpecError(
            f"doctor: {what} (saved hosts: {names}; `autodl-run hosts` lists them)",
            [],
            hint='give a saved host, a job.toml, or `local` (this machine); save a host with '
            'autodl-run login "ssh -p PORT root@HOST"',
        )
    profile = profiles.find(target)
    return profile.name, InstanceSpec(profile=profile.name)


def doctor(target: str | None = None) -> DoctorReport:
    label, instance = resolve_target(target)
    transport = connect(instance)
    try:
        opener = getattr(transport, "open", None)
        if opener:
            opener()  # connect first, so the clock below is not off by the handshake
        bundle_dir, bundle_error = _sync_bundle(transport, instance)
        t0 = time.time()
        res = transport.run(_command(instance, bundle_dir), check=False, timeout=300)
        t1 = time.time()
    finally:
        transport.close()
    found = parse(res.stdout, t0, t1)
    found.bundle = BundleInfo(dir=bundle_dir or None, error=bundle_error)
    rows = checks(found, instance)
    return DoctorReport(
        **dict(found), target=label, where=transport.where, python_setting=instance.python,
        network_turbo_setting=instance.network_turbo, checks=rows, ok=not any(c.status == "fail" for c in rows),
    )  # fmt: skip


def _sync_bundle(transport: Transport, instance: InstanceSpec) -> tuple[str, str | None]:
    """The worker bundle on the instance, sent if needed (the python probe runs from it): (its folder, error)."""
    root = instance_root(instance)
    try:
        if root.startswith("~"):
            root = transport.run(["bash", "-c", 'printf %s "$HOME"']).stdout.strip() + root[1:]
        layout = RemoteLayout(root)
        return layout.bundle_dir(sync_bundle(transport, layout)[0]), None
    except AutodlRunError as exc:
        return "", f"cannot send the worker bundle to {root}: {exc.message.splitlines()[0]}"


def _command(instance: InstanceSpec, bundle_dir: str) -> list[str]:
    extra = ""
    if instance.remote_root and not instance.remote_root.startswith("~"):
        extra = instance.remote_root
    args = [
        instance.python or "python3", bundle_dir, DATA_DISK, AUTODL_FS, extra, NETWORK_TURBO,
        instance.pip_index_url or "", instance.hf_endpoint or "", str(int(instance.network_turbo)),
        str(NET_TIMEOUT_S), *PYTHON_CANDIDATES,
    ]  # fmt: skip
    return ["bash", "-c", script("doctor.sh"), "doctor", *args]


def _kv(lines: list[str]) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in lines if "=" in ln)


def parse(stdout: str, t0: float, t1: float) -> Findings:
    s = sections(stdout)
    clock = float(s["clock"][0]) if s.get("clock") and _is_float(s["clock"][0]) else None
    os_lines = s.get("os", [])
    py = _kv(s.get("python", []))
    pyinfo, probe_error = EnvProbe(python="", executable=""), None
    lines = [ln for ln in s.get("pyinfo", []) if ln.startswith("{")]
    if lines:
        try:
            pyinfo = read_model(EnvProbe, lines[-1], "the python probe")
        except ProtocolError as exc:
            probe_error = str(exc)
    gpus: list[Gpu] = []
    driver: str | None = None
    for line in s.get("gpu", []):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[1].isdigit():
            gpus.append(Gpu(name=parts[0], memory_mib=int(parts[1]), memory_used_mib=int(parts[2])))
            driver = parts[3]
    disks = {}
    for line in s.get("disks", []):
        path, space, inodes = (line.split("|") + ["", ""])[:3]
        sp, ino = space.split(), inodes.split()
        if len(sp) >= 4 and sp[1].isdigit():
            disks[path] = Disk(
                total_bytes=int(sp[1]) * 1024,
                free_bytes=int(sp[3]) * 1024,
                mount=sp[-1],
                inodes_total=int(ino[1]) if len(ino) >= 4 and ino[1].isdigit() else None,
                inodes_free=int(ino[3]) if len(ino) >= 4 and ino[3].isdigit() else None,
            )
    tools = {}
    for k, v in _kv(s.get("tools", [])).items():
        path, _, version = v.partition("|")
        tools[k] = Tool(path=path or None, version=version.strip() or None)
    urls = _kv(s.get("urls", []))
    net = {}
    for k, v in _kv(s.get("net", [])).items():
        code, _, secs = v.partition(" ")
        code_i = int(code) if code.isdigit() else 0
        net[k] = Reach(http_code=code_i, seconds=float(secs) if _is_float(secs) else None, reachable=0 < code_i < 500)
    conda = py.get("conda_prefix") or None
    py_path = py.get("path") or None
    candidates = [v for k, v in (ln.split("=", 1) for ln in s.get("python", []) if "=" in ln) if k == "candidate"]
    return Findings(
        os=OsInfo(name=os_lines[0] if os_lines else None, kernel=os_lines[1] if len(os_lines) > 1 else None),
        python=PythonInfo(
            path=py_path, version=pyinfo.python or None, executable=pyinfo.executable or None,
            probe_error=probe_error,
            conda=bool(conda and py_path and py_path.startswith(conda)) or bool(py_path and "conda" in py_path),
            conda_prefix=conda, conda_env=py.get("conda_env") or None, candidates=candidates,
        ),
        torch=TorchInfo(
            version=pyinfo.torch, cuda=pyinfo.torch_cuda, cuda_available=pyinfo.cuda_available, error=pyinfo.torch_error
        ),
        gpu=GpuInfo(count=len(gpus), gpus=gpus, driver=driver, torch_gpus=[g.model_dump() for g in pyinfo.gpus]),
        packages={k: v for k, v in pyinfo.packages.items() if k != "torch"},
        flash_attn=bool(pyinfo.packages.get("flash-attn") or pyinfo.flash_attn_importable),
        disks=disks,
        tools=tools,
        network_turbo_available=(s.get("turbo") or ["0"])[0] == "1",
        pip_index=_endpoint(urls.get("pip"), net.get("pip"), net.get("pip_turbo")),
        hf_endpoint=_endpoint(urls.get("hf"), net.get("hf"), net.get("hf_turbo")),
        clock=Clock(skew_s=None if clock is None else round(clock - t0, 2), round_trip_s=round(t1 - t0, 2)),
    )  # fmt: skip


def _endpoint(url: str | None, direct: Reach | None, turbo: Reach | None) -> Endpoint:
    d = direct or Reach()
    return Endpoint(url=url, http_code=d.http_code, seconds=d.seconds, reachable=d.reachable, through_turbo=turbo)


def _is_float(x: str) -> bool:
    try:
        float(x)
    except ValueError:
        return False
    return True


def _gb(n: float | None) -> str:
    return "?" if n is None else f"{n / GB:.1f} GB"


def checks(r: Findings, instance: InstanceSpec) -> list[Check]:
    """The findings as rows: ok, warn (works, with a cost), fail (fix it first), info."""
    return [
        Check(name="os", status="ok" if r.os.name else "info", detail=f"{r.os.name} ({r.os.kernel})"),
        *_python_checks(r, instance),
        *_gpu_checks(r),
        *_disk_checks(r.disks),
        *_package_checks(r),
        *_tool_checks(r.tools),
        _net_check("pip index", r.pip_index, "pip_index_url", MIRRORS["pip"], instance),
        _net_check("hf endpoint", r.hf_endpoint, "hf_endpoint", MIRRORS["hf"], instance),
        *_clock_check(r.clock.skew_s),
    ]


def _check(name: str, status: Status, detail: str, hint: str = "") -> Check:
    return Check(name=name, status=status, detail=detail, hint=hint)


def _python_checks(r: Findings, instance: InstanceSpec) -> list[Check]:
    py, t = r.python, r.torch
    bundle_error = r.bundle.error
    if not py.version and py.path and (bundle_error or py.probe_error):
        hint = "set instance.remote_root to a folder the login user can write" if bundle_error else ""
        return [_check("python", "fail", f"{py.path}: not probed ({bundle_error or py.probe_error})", hint)]
    if not py.version:
        first = py.candidates[0] if py.candidates else None
        hint = (
            f"set instance.python = {json.dumps(first)}"
            if first
            else "install Python 3.10+, or set instance.python"
        )
        return [_check("python", "fail", f"`{instance.python}` not found in a login shell", hint)]
    conda = f", conda env {py.conda_env or py.conda_prefix}" if py.conda else ""
    out = [_check("python", "ok", f"{py.path} (Python {py.version}{conda}, found by bash -lc)")]
    if t.version:
        cuda = f" (CUDA {t.cuda})" if t.cuda else " (no CUDA build)"
        out.append(_check("torch", "ok", t.version + cuda))
    else:
        hint = "pick an image with PyTorch (autodl-run never installs torch: it must match the driver)"
        out.append(_check("torch", "fail", t.error or "not installed", hint))
    return out


def _gpu_checks(r: Findings) -> list[Check]:
    gpu, t = r.gpu, r.torch
    if gpu.gpus:
        names = ", ".join(f"{g.name} {g.memory_mib / 1024:.0f} GiB" for g in gpu.gpus)
        out = [_check("gpu", "ok", f"{names}; driver {gpu.driver}")]
    else:
        hint = "on AutoDL, power the instance on with a GPU (not 无卡模式); elsewhere, install the driver"
        out = [_check("gpu", "fail", "no NVIDIA GPU visible (nvidia-smi)", hint)]
    if not t.version:
        return out
    if t.cuda_available:
        out.append(_check("cuda", "ok", "torch can use the GPU"))
    elif gpu.gpus:
        hint = f"torch {t.version} cannot use the GPU (driver {gpu.driver}): pick an image whose PyTorch matches it"
        out.append(_check("cuda", "fail", "torch.cuda.is_available() is False", hint))
    else:
        out.append(
            _check("cuda", "fail", "torch.cuda.is_available() is False", "no GPU: training would run on the CPU")
        )
    return out


def _package_checks(r: Findings) -> list[Check]:
    reqs = {**WORKER_REQUIREMENTS, **QLORA_REQUIREMENTS}
    out = []
    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        version = r.packages.get(name)
        if version:
            out.append(_check(name, "ok", version))
        elif r.python.version:
            out.append(_check(name, "warn", "not installed", f"submit installs it ({reqs[name]}) with pip"))
    if r.flash_attn:
        out.append(_check("flash-attn", "ok", r.packages.get("flash-attn") or "installed"))
    else:
        out.append(_check("flash-attn", "info", "not installed: SDPA attention is used"))
    return out


def _tool_checks(tools: dict[str, Tool]) -> list[Check]:
    fallbacks = {
        "tmux": "submit installs it with apt-get when it can, else jobs run under setsid nohup",
        "rsync": "files go over SFTP instead (slower for big data): apt-get install -y rsync",
    }
    out = []
    for name, hint in fallbacks.items():
        found = tools.get(name, Tool())
        if found.path:
            out.append(_check(name, "ok", found.version or found.path))
        else:
            out.append(_check(name, "warn", "not installed", hint))
    return out


def _clock_check(skew: float | None) -> list[Check]:
    if skew is None:
        return []
    status: Status = "ok" if abs(skew) < 5 else "warn" if abs(skew) < 300 else "fail"
    hint = (
        "" if status == "ok" else "elapsed times, ETA and spend will be off: sync the clock (chrony/ntpdate)"
    )
    return [_check("clock", status, f"{skew:+.1f} s against this machine", hint)]


def _disk_checks(disks: dict[str, Disk]) -> list[Check]:
    roles = {"/": "system disk", DATA_DISK: "data disk", AUTODL_FS: "autodl-fs"}
    out, seen = [], set()
    for path, d in disks.items():
        role = roles.get(path, "remote_root")
        if role == "remote_root" and d.mount in seen:
            continue  # the job folder's disk is one of the above
        seen.add(d.mount)
        out.append(_disk_check(path, role, d))
    if DATA_DISK not in disks:
        hint = "set instance.remote_root to a folder on a disk with room"
        out.append(_check("data disk", "info", f"no {DATA_DISK} (not an AutoDL instance?)", hint))
    return out


def _disk_check(path: str, role: str, d: Disk) -> Check:
    free, ino_free, ino_total = d.free_bytes, d.inodes_free, d.inodes_total
    detail = f"{path}: {_gb(free)} free of {_gb(d.total_bytes)}"
    if ino_total:
        detail += f", {ino_free or 0:,} of {ino_total:,} inodes free"
    low, very_low = (5 * GB, 1 * GB) if role == "system disk" else (20 * GB, 2 * GB)
    status: Status = "ok"
    hints = []
    if free < very_low:
        status = "fail"
        hints.append(f"free space on {path} (du -sh {path.rstrip('/')}/* | sort -h)")
    elif free < low:
        status = "warn"
        hints.append(f"little space on {path}: a 7B model with checkpoints needs about 20 GB")
    if ino_total and ino_free is not None and ino_free < max(10_000, ino_total // 20):
        status = "fail" if ino_free < 1000 else ("warn" if status == "ok" else status)
        hints.append(f"few inodes left on {path}: remove small files (pip caches, old runs)")
    if role == "system disk" and status != "ok":
        hints.append(f"AutoDL: keep models and data on {DATA_DISK}, not /")
    return _check(role, status, detail, "; ".join(hints))


def _net_check(name: str, r: Endpoint, field: str, mirror: str, instance: InstanceSpec) -> Check:
    via = f" (through {NETWORK_TURBO})" if instance.network_turbo else ""
    if r.reachable:
        return _check(name, "ok", f"{r.url}{via}: HTTP {r.http_code} in {r.seconds or 0:.2f} s")
    if r.through_turbo and r.through_turbo.reachable:
        hint = f'it answers through {NETWORK_TURBO}: set instance.network_turbo = true (or instance.{field} = "{mirror}")'
    else:
        hint = f'set instance.{field} = "{mirror}" (a mirror reachable from China)'
    code = r.http_code or "none"
    return _check(name, "fail", f"{r.url}{via}: unreachable (HTTP {code}; timeout {NET_TIMEOUT_S} s)", hint)
