"""The steps `submit` and `resume` are made of (client.lifecycle.pipeline), and what they share.

connect → sync → setup → model → launch each take the session (client.session) and the spec as the
user wrote it; what runs on the instance gets `session.placed(spec)` (the resolved remote root).
"""

from __future__ import annotations

import json
import posixpath
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from client import activity
from client.errors import AutodlRunError, JobError, Problem, SpecError
from client.lifecycle.pipeline import Log, Step
from client.remote import guard as guard_launch
from client.remote import launcher
from client.remote.bundle import sync_bundle
from client.remote.prefetch import Prefetched, prefetch_model
from client.remote.setup import WorkerEnv, ensure_worker_deps, python_of
from client.remote.sync import remote_exists, sync_dir
from client.session import Session, open_session
from jobs.layout import DATASET_MANIFEST, JobPaths, RemoteLayout
from jobs.spec import JobSpec, WorkerJob


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# --- check: the deadline -------------------------------------------------------------------------------

_DURATION = re.compile(
    r"^\+?(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$"
)


def parse_deadline(text: str, now: float | None = None) -> float:
    """`--deadline`: a duration from now (`90m`, `3h`, `1h30m`, `+45s`, `2d`), a clock time today
    (`18:30`, tomorrow if already past), or a date and time (`2026-12-01 18:00`, ISO 8601, local
    time unless it names an offset). Returns unix time; raises ValueError."""
    now = time.time() if now is None else now
    text = text.strip()
    m = _DURATION.match(text.lower())
    if text and m and any(m.groups()):
        d, h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
        return now + d * 86400 + h * 3600 + mi * 60 + sec
    try:
        clock = re.match(r"^(\d{1,2}):(\d{2})$", text)
        if clock:
            base = datetime.fromtimestamp(now)
            at = base.replace(hour=int(clock.group(1)), minute=int(clock.group(2)), second=0, microsecond=0)
            if at.timestamp() <= now:
                at += timedelta(days=1)
            return at.timestamp()
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"cannot read the deadline {text!r}: give a duration (90m, 3h, 1h30m), a time (18:30) "
            "or a date and time (2026-12-01 18:00)"
        ) from None


def deadline_for(
    spec: JobSpec, job_file: Path, deadline_unix: float | None, now: float | None = None
) -> float | None:
    """The sooner of `instance.expires_at` and `--deadline`; an error if it has passed already."""
    now = time.time() if now is None else now
    candidates: list[tuple[float, str]] = []
    if spec.instance.expires_at is not None:
        candidates.append((spec.instance.expires_at.timestamp(), "instance.expires_at"))
    if deadline_unix is not None:
        candidates.append((deadline_unix, "--deadline"))
    if not candidates:
        return None
    at, field = min(candidates)
    if at <= now:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        raise SpecError(
            f"the deadline has passed ({when})",
            [Problem(str(job_file), None, field, f"{when} is in the past")],
            hint="give a later time, or leave the deadline out",
        )
    return at


# --- sync: data and worker -----------------------------------------------------------------------------


@dataclass
class Synced:
    data_sent: bool
    bundle_digest: str
    bundle_sent: bool

    def describe(self) -> str:
        return (
            f"data {'uploaded' if self.data_sent else 'already on the instance'}, "
            f"worker {'uploaded' if self.bundle_sent else 'already on the instance'}"
        )


def sync(session: Session, digest: str, data: Path | Callable[[], Path]) -> Synced:
    """Send the prepared data (unless the instance has it) and the worker bundle (likewise).

    `data`: the prepared folder, or a function that prepares it, called only when the instance lacks it."""
    layout = session.layout
    dest = layout.data_dir(digest)
    if callable(data) and remote_exists(session.transport, posixpath.join(dest, DATASET_MANIFEST)):
        data_sent = False
    else:
        local = data() if callable(data) else data
        with activity.naming("upload the dataset"):  # rsync's progress (client.activity) under this name
            data_sent = sync_dir(session.transport, local, dest, marker=DATASET_MANIFEST)
    with activity.naming("upload the worker"):
        bundle_digest, bundle_sent = sync_bundle(session.transport, layout)
    return Synced(data_sent, bundle_digest, bundle_sent)


# --- setup, model, launch --------------------------------------------------------------------------------


def setup(session: Session, spec: JobSpec, bundle_digest: str, log: Log) -> WorkerEnv:
    return ensure_worker_deps(
        session.transport, session.placed(spec), log=log, bundle_dir=session.layout.bundle_dir(bundle_digest)
    )


def model(session: Session, spec: JobSpec, job_id: str, bundle_digest: str, log: Log) -> Prefetched:
    """The model download before launch (a hub model into HF_HOME on the instance), with its progress lines."""
    layout = session.layout
    return prefetch_model(
        session.transport, session.placed(spec), layout.job(job_id), layout.bundle_dir(bundle_digest), log=log
    )


def _describe_model(result: Prefetched) -> str:
    return f"model download skipped: {result.skipped}" if result.skipped else ""


def worker_env(spec: JobSpec, layout: RemoteLayout, bundle_dir: str) -> dict[str, str]:
    env = {
        "PYTHONPATH": bundle_dir,
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": layout.hf_home(),
        # Without it the CUDA allocator reserved 70 GB for 28 GB allocated (shared/anchors.md).
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if spec.instance.hf_endpoint:
        env["HF_ENDPOINT"] = spec.instance.hf_endpoint
    return env


def launch(
    session: Session, spec: JobSpec, job_id: str, digest: str, bundle_digest: str, deadline_unix: float | None
) -> bool:
    """Write job.json, start the worker under tmux, then its guard (unless the policy is "never").

    Returns whether a guard was started. The worker resumes from the newest checkpoint in its job folder.
    """
    layout, placed = session.layout, session.placed(spec)
    paths = put_job_json(session, placed, job_id, digest, deadline_unix)
    env = worker_env(placed, layout, layout.bundle_dir(bundle_digest))
    argv = launcher.worker_argv(python_of(placed.instance), paths.spec, placed.train, node_of(spec, 0))
    launcher.launch(session.transport, paths, argv, socket=placed.instance.tmux_socket, session=job_id, env=env)
    return guard_launch.start_guard(session.transport, placed, paths, job_id, env) is not None


def put_job_json(
    session: Session, placed: JobSpec, job_id: str, digest: str, deadline_unix: float | None
) -> JobPaths:
    """Write the worker's `job.json` (the placed spec and where this job's things are) into the job's folder
    on the session's instance; returns the job's paths there."""
    layout = session.layout
    paths = layout.job(job_id)
    job = WorkerJob(
        job_id=job_id, spec=placed, data_dir=layout.data_dir(digest), job_dir=paths.dir,
        hf_home=layout.hf_home(), deadline_unix=deadline_unix,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / posixpath.basename(paths.spec)
        local.write_text(json.dumps(job.model_dump(mode="json"), indent=2))
        session.transport.put(local, paths.spec)
    return paths


def node_of(spec: JobSpec, rank: int) -> launcher.Node:
    """Node `rank` of this spec's machines: the instance is node 0, each of instance.hosts one more."""
    inst = spec.instance
    return launcher.Node(rank, 1 + len(inst.hosts), inst.rdzv_host or inst.host or "", inst.rdzv_port)


def node_spec(spec: JobSpec, rank: int) -> JobSpec:
    """The spec as node `rank` (1, 2, ...) runs it: node 0's instance fields with instance.hosts[rank - 1]
    as its login (and no hosts of its own)."""
    fields = spec.instance.model_dump(exclude={"ssh", "host", "port", "user", "profile", "identity_file", "hosts"})
    login = spec.instance.hosts[rank - 1]
    return spec.model_copy(update={"instance": type(spec.instance).model_validate({**fields, "ssh": login})})


# --- how many processes a node can run -----------------------------------------------------------------

# the GPUs nvidia-smi lists (0 without it), then the CPU cores this login may use (nproc would count
# OMP_NUM_THREADS instead, where it is set)
_COUNT = ("printf 'gpus '; { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true; } | grep -c .; "
          "printf 'cores '; env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN")  # fmt: skip


@dataclass(frozen=True)
class Capacity:
    gpus: int  # 0: none listed (no nvidia-smi, or no GPU)
    cores: int | None  # None: not told


def capacity(session: Session) -> Capacity:
    """How many GPUs and CPU cores the session's machine has (one round trip)."""
    res = session.transport.run(["bash", "-c", _COUNT], check=False, timeout=60)
    found: dict[str, int] = {}
    for line in res.stdout.splitlines():
        key, _, value = line.strip().partition(" ")
        if key in ("gpus", "cores") and value.strip().isdigit():
            found[key] = int(value)
    return Capacity(found.get("gpus", 0), found.get("cores"))


def check_processes(session: Session, spec: JobSpec, job_file: str, field: str = "train.gpus") -> None:
    """Refuse train.gpus (`field`: the flag that set it) above what this node has, before anything is
    launched: its GPUs where nvidia-smi lists some (a CUDA job), else its CPU cores (a process each)."""
    gpus = spec.train.gpus
    if not isinstance(gpus, int) or gpus == 1:
        return
    cap = capacity(session)
    on_gpu = spec.train.device != "cpu" and cap.gpus > 0
    have, what = (cap.gpus, "GPU(s)") if on_gpu else (cap.cores, "CPU core(s)")
    if have is None or gpus <= have:
        return
    flag = f"--gpus {gpus}" if field.startswith("--") else f"train.gpus = {gpus}"
    job = "" if on_gpu else " (a CPU job: one process a core)"
    raise SpecError(
        f"{flag}: {session.where} has {have} {what}{job}; a node runs train.gpus processes",
        [Problem(job_file, None, field, f"{gpus} is more than the {have} {what} on {session.where}")],
        hint=(f"use {'--gpus' if field.startswith('--') else 'train.gpus ='} {have} or fewer"
              + (' (or "all")' if on_gpu else "") + ", or rent an instance with more"),
    )  # fmt: skip


# --- the other nodes ------------------------------------------------------------------------------------


@dataclass
class ReadyNode:
    """Node `rank`, synced, set up, its model downloaded and its job.json written: only the launch is left."""

    rank: int
    session: Session
    argv: list[str]
    env: dict[str, str]
    paths: JobPaths
    socket: str


def node_failed(spec: JobSpec, rank: int, what: str, exc: BaseException) -> JobError:
    login = spec.instance.hosts[rank - 1]
    detail = exc.message if isinstance(exc, AutodlRunError) else f"{type(exc).__name__}: {exc}"
    hint = exc.hint if isinstance(exc, AutodlRunError) and exc.hint else ""
    return JobError(
        f"node {rank} of {1 + len(spec.instance.hosts)} ({login!r}, instance.hosts[{rank - 1}]) failed to {what}: {detail}",
        hint=(hint + "; then " if hint else "") + "make that host reachable and ready (`autodl-run doctor` with its "
        "login), or take it out of instance.hosts, and submit the job again",
    )  # fmt: skip


def prepare_nodes(spec: JobSpec, job_file: str, job_id: str, digest: str, prepared: Path | Callable[[], Path],
                  deadline_unix: float | None, log: Log, stack: ExitStack) -> list[ReadyNode]:  # fmt: skip
    """The other nodes (instance.hosts), each like the instance: sync, the process count, set-up, model,
    job.json. Their sessions stay open in `stack` for the launch (launch_nodes), which comes only once
    every node is ready, so a node that fails here leaves nothing running anywhere."""
    ready = []
    for rank in range(1, 1 + len(spec.instance.hosts)):
        node = node_spec(spec, rank)
        try:
            session = stack.enter_context(open_session(node))
            bundle_digest = sync(session, digest, prepared).bundle_digest
            check_processes(session, node, job_file)
            setup(session, node, bundle_digest, log)
            model(session, node, job_id, bundle_digest, log)
            layout, placed = session.layout, session.placed(node)
            paths = put_job_json(session, placed, job_id, digest, deadline_unix)
        except (AutodlRunError, OSError) as exc:
            raise node_failed(spec, rank, "get ready", exc) from exc
        argv = launcher.worker_argv(python_of(placed.instance), paths.spec, placed.train, node_of(spec, rank))
        env = worker_env(placed, layout, layout.bundle_dir(bundle_digest))
        ready.append(ReadyNode(rank, session, argv, env, paths, placed.instance.tmux_socket))
        log(f"node {rank} of {1 + len(spec.instance.hosts)} ready on {session.where}")
    return ready


def launch_nodes(spec: JobSpec, job_id: str, ready: list[ReadyNode], first: Session, log: Log) -> list[str]:
    """Launch the ready nodes after node 0 (on `first`); they meet it at its rendezvous. Their guards are
    not started (node 0's guard and the follower watch the job). When one cannot be launched, node 0 and
    the nodes launched before it are stopped (they would wait at the rendezvous) and the error names it."""
    launched: list[ReadyNode] = []
    for node in ready:
        try:
            launcher.launch(node.session.transport, node.paths, node.argv, socket=node.socket, session=job_id,
                            env=node.env)  # fmt: skip
        except AutodlRunError as exc:
            error = node_failed(spec, node.rank, "launch", exc)
            stopped = _stop_launched(spec, job_id, first, launched)
            error.message += f"; {stopped}"
            raise error from exc
        launched.append(node)
        log(f"node {node.rank} of {1 + len(spec.instance.hosts)} launched on {node.session.where}")
    return [n.session.where for n in launched]


STOP_GRACE_S = 10.0  # nothing trained yet: the ranks wait at the rendezvous, no checkpoint to save


def _stop_launched(spec: JobSpec, job_id: str, first: Session, launched: list[ReadyNode]) -> str:
    """Stop node 0 and `launched`; says what was stopped and what could not be (then `cancel` is the way)."""
    targets = [(0, first, first.layout.job(job_id), spec.instance.tmux_socket)]
    targets += [(n.rank, n.session, n.paths, n.socket) for n in launched]
    done, left = [], []
    for rank, session, paths, socket in targets:
        try:
            launcher.cancel(session.transport, paths, socket=socket, session=job_id, grace=STOP_GRACE_S)
            done.append(str(rank))
        except AutodlRunError as exc:
            left.append(f"node {rank} ({exc.message})")
    said = f"the job was stopped on node(s) {', '.join(done)}" if done else "nothing was stopped"
    if left:
        said += f"; still running: {'; '.join(left)}: stop it with `autodl-run cancel {job_id}`"
    return said


def ensure_guard(session: Session, spec: JobSpec, job_id: str, bundle_digest: str) -> bool:
    """A running job whose guard is not running gets one (unless the policy is "never"). Returns whether
    one was started."""
    if spec.instance.shutdown_policy == "never" or not bundle_digest:
        return False
    layout = session.layout
    paths = layout.job(job_id)
    if launcher.job_status(session.transport, paths.guard).active:
        return False
    placed = session.placed(spec)
    env = worker_env(placed, layout, layout.bundle_dir(bundle_digest))
    return guard_launch.start_guard(session.transport, placed, paths, job_id, env) is not None


# --- plan: will the job fit the instance's card? -----------------------------------------------------

GPU_QUERY = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
CONFIG_MAX_BYTES = 1 << 20


@dataclass
class Planned:
    """What the plan step found: the card it planned for (None: no GPU reported, nothing planned)."""

    card: str | None
    plan: object | None = None  # client.plan.Plan
    skipped: str = ""

    def describe(self) -> str:
        if self.plan is None:
            return f"plan skipped: {self.skipped}"
        row = self.plan.rows[0]  # type: ignore[attr-defined]
        return (
            f"{row.card.name} ({row.card.memory_gb:g} GB): about {row.estimate.peak / 1e9:.1f} GB at "
            f"{row.shape.micro_batch_tokens:,} tokens, {row.shape.checkpointed} layers checkpointed; "
            f"the calibration on the card decides"
        )


def instance_gpu(session: Session) -> tuple[str, float, int] | None:
    """(name, memory GB) of the instance's first GPU as nvidia-smi reports it, and how many GPUs it
    reports; None without one."""
    res = session.transport.run(GPU_QUERY, check=False, timeout=30)
    if not res.ok:
        return None
    found: list[tuple[str, float]] = []
    for line in res.stdout.splitlines():
        name, _, mib = line.rpartition(",")
        try:
            found.append((name.strip(), float(mib) * 1048576 / 1e9))
        except ValueError:
            continue
    return (*found[0], len(found)) if found else None


def _model_config(session: Session, spec: JobSpec) -> tuple[dict, str]:
    """The model's config.json: read on the instance for a path there, else as `autodl-run plan` does."""
    from client.home import home
    from client.plan import CONFIGS
    from client.plan import config as configs

    name = spec.model.name_or_path
    if configs.looks_like_path(name):
        path = posixpath.join(name, "config.json")
        res = session.transport.run(["head", "-c", str(CONFIG_MAX_BYTES), path], check=False, timeout=30)
        if not res.ok:
            raise configs.ConfigError(f"no {path} on {session.where}", hint="check model.name_or_path")
        try:
            return json.loads(res.stdout), f"{session.where}:{path}"
        except ValueError as exc:
            raise configs.ConfigError(f"{session.where}:{path} is not JSON: {exc}") from exc
    return configs.load(name, revision=spec.model.revision, hf_endpoint=spec.instance.hf_endpoint,
                        cache=home() / CONFIGS, timeout=5.0)  # fmt: skip


def plan(session: Session, spec: JobSpec, report: dict, gpu: str | None = None) -> Planned:
    """Plan the job for the instance's card (or `gpu`, a card of the table: `submit --gpu`), and refuse it
    (client.plan.DoesNotFit) when it cannot fit, before anything is synced or downloaded. Without a GPU, or
    without the model's config, nothing is planned: the worker's calibration decides as before."""
    from client.home import home
    from client.plan import config as configs
    from client.plan import load_cards, make_plan, pick_cards, refusal, spec_gpus
    from jobs import cards as cardtable

    table = load_cards(home())
    count = None
    if gpu:
        card = pick_cards([gpu], table)[0]
    else:
        found = instance_gpu(session)
        if found is None:
            return Planned(None, skipped=f"no GPU reported by nvidia-smi on {session.where}")
        card, count = cardtable.measured(found[0], found[1], table), found[2]
    try:
        cfg, where = _model_config(session, spec)
        arch = configs.arch(cfg, where)
    except configs.ConfigError as exc:
        return Planned(card.name, skipped=f"no model config ({exc.message})")
    result = make_plan(spec, arch, where, report, [card], spec_gpus(spec, count))  # FSDP shares a model over GPUs
    if not result.any_fits:
        raise refusal(result, f"the instance's card on {session.where}" if not gpu else f"--gpu {gpu}")
    return Planned(card.name, result)


CONNECT = Step("connect", open_session)
SYNC = Step("sync", sync, Synced.describe)
def _describe_setup(env: WorkerEnv) -> str:
    return f"python {env.python}, torch {env.torch}"


SETUP = Step("setup", setup, _describe_setup)
MODEL = Step("model", model, _describe_model)
PLAN = Step("plan", plan, Planned.describe)
LAUNCH = Step("launch", launch)
