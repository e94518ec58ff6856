"""Where things live on the instance, under `instance.remote_root` (the persistent data disk).

    {root}/data/{sha256}/          a prepared dataset, content-addressed (never re-sent)
        train.jsonl eval.jsonl dataset.json [tokens/...]   (dataset.json: jobs.protocol.DatasetManifest)
    {root}/bundles/{sha256}/       the worker code (remote_worker + jobs), content-addressed
    {root}/jobs/{job_id}/          one job
        launch.json                the job's identity, written by the client before it launches
                                   (jobs.protocol.LaunchRecord): a rerun of submit finds the job by it
        job.json                   the resolved spec the worker runs
        events.jsonl               the event stream (see jobs.events)
        worker.log                 stdout+stderr of the worker
        state                      running | done | failed | cancelled
        exit_code                  written by the launcher when the worker process ends
        pid                        the worker's process id
        output/adapter/            the final LoRA adapter + manifest.json (sha256 of every file)
        output/checkpoints/step-N/ checkpoints, each complete or absent (written, then renamed):
            manifest.json          sha256 of every file below, adapter/ included
            adapter/               the adapter alone (hard links) + its own manifest.json: what auto-fetch pulls
            optimizer.pt scheduler.pt rng_state.pth trainer_state.json ...   what resuming needs
        .reserve                   ballast the worker frees when the disk fills, to report it and stop cleanly
        transfer.json              the client's measured download speed (the worker sizes its deadline margin by it)
        fetching.<token>           a lease: a client touches it while its fetch runs (the guard waits for it)
        fetched.json               the client's acknowledgement: which adapter it holds, verified (sha256)
        trainer_state.json         the Trainer's state (log history), written by the worker at each save and at the end
        eval_results.json          every evaluation's metrics, a JSON list (jobs.protocol.EvalResults)
        tensorboard/               TensorBoard event files (on AutoDL: /root/tf-logs/<job id>, see tensorboard_dir)
        guard/                     the guard process (remote_worker.guard), launched like a job:
            run.sh pid state exit_code worker.log   (client.remote.launcher)
            status.json            what the guard is doing or did: waiting, copied, shut down
        prefetch/                  the model download, launched like a job; result.json (ModelDownload)
        post/{task}/               after training (eval, export-merged, export-gguf-q8_0, ...), launched like a job:
            run.sh pid state exit_code worker.log
            prompts.jsonl          (eval) the prompts file the laptop sent
            result/                what it made + manifest.json (eval.json eval.md | model files export.json)
            fetched.json           the client's acknowledgement of that result (FetchAck): the guard waits for it
    {root}/submissions/{key}       which job a submission (spec + data) became: one launch per key
    {root}/submissions/{key}.lock  held (a directory, its `owner` token inside) while a client claims the key
    {root}/.setup/                 set-up's markers (deps-KEY.json: SetupMarker; apt-tmux-failed)
    {root}/hf/                     HF_HOME on the data disk
    {root}/modelscope/             MODELSCOPE_CACHE on the data disk (models downloaded from ModelScope)

Any laptop can reattach to a job from this layout alone. This module is the only place a remote
file name is spelled (tests/test_contract.py checks it); what each file holds is jobs.protocol.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobs import autodl

if TYPE_CHECKING:
    from jobs.spec import JobSpec

MANIFEST = "manifest.json"  # jobs.protocol.FolderManifest, beside an adapter or a checkpoint
DATASET_MANIFEST = "dataset.json"  # jobs.protocol.DatasetManifest, in a prepared dataset folder
BATCH_SHAPE = "batch_shape.json"  # jobs.protocol.BatchShape, in a checkpoint
CHECKPOINT_ADAPTER = "adapter"  # step-N/adapter/: the adapter alone, with its own manifest
LEASE_PREFIX = "fetching."  # fetching.<token>: a client's lease while it fetches
WRAPPER = "run.sh"  # the launcher's wrapper script in a job (or guard, prefetch) folder
WRAPPER_PATH = ".path"  # the PATH the launching shell had
SETUP_DIR = ".setup"
BASE_MODEL = "base_model.json"  # jobs.protocol.BaseModelRecord, in an adapter folder: the base it was trained on
EVAL_JSON = "eval.json"  # jobs.protocol.EvalResult, in post/eval/result/
EVAL_MD = "eval.md"  # the same, side by side, for a person
EXPORT_JSON = "export.json"  # jobs.protocol.ExportRecord, in post/export-*/result/
MODELFILE = "Modelfile"  # Ollama's, beside the GGUF file
POST_DIR = "post"  # after-training tasks, each in a folder laid out like a job's
_TASK_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
APT_FAILED = "apt-tmux-failed"  # in .setup/: apt-get could not install tmux; never tried again
# The file names of a job folder, for the shell scripts that work inside one (client.remote.launcher,
# client.remote.follow): they get these from here, never spell them.
JOB_FILES = {
    "state": "state",
    "exit_code": "exit_code",
    "pid": "pid",
    "log": "worker.log",
    "events": "events.jsonl",
    "launch": "launch.json",
    "wrapper": WRAPPER,
    "wrapper_path": WRAPPER_PATH,
}
# The job's record: what the laptop keeps once the instance is gone (client.record), append-only text
# files read from a byte offset, and whole files re-read each time.
RECORD_APPEND = ("events", "log")
RECORD_WHOLE = ("trainer_state", "eval_results")
RECORD_FILES = {"trainer_state": "trainer_state.json", "eval_results": "eval_results.json"}
TENSORBOARD = "tensorboard"
SWANLOG = "swanlog"  # SwanLab's log folder, in the job folder and in the laptop's record
TB_FILE_RE = re.compile(r"^events\.out\.tfevents\.[A-Za-z0-9._-]{1,200}$")  # what a TensorBoard writer names
REPORT = "report.md"
_STEP_RE = re.compile(r"^step-([0-9]{1,15})$")  # ASCII digits, bounded: a listing from the instance


def checkpoint_name(step: int) -> str:
    return f"step-{step}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder's name (`step-N`), or None for anything else."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def gguf_name(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def post_task(name: str) -> str:
    """An after-training task's folder name (`eval`, `export-merged`, `export-gguf-q8_0`), checked."""
    if not _TASK_RE.match(name):
        raise ValueError(f"bad task name {name!r}")
    return name


@dataclass(frozen=True)
class Placement:
    """Where a job lives on its instance, resolved once per connection (client.session): never the
    user's spec, which keeps `remote_root` as written (`~` and all)."""

    remote_root: str  # absolute: `~` resolved against `home`
    home: str | None = None  # the login user's $HOME there (None: not asked, e.g. a ledger row)
    python: str = "python3"


def tensorboard_dir(job_dir: str, job_id: str, on_autodl: bool) -> str:
    """Where a job's TensorBoard files go: AutoDL's panel folder there, else the job folder's `tensorboard/`."""
    return posixpath.join(autodl.TF_LOGS, job_id) if on_autodl else posixpath.join(job_dir, TENSORBOARD)


def layout_for(placement: Placement | JobSpec) -> RemoteLayout:
    """The layout of a placed job. A JobSpec is accepted for a spec whose remote_root is absolute
    already (records from before placements were stored apart)."""
    root = placement.remote_root if isinstance(placement, Placement) else placement.instance.remote_root
    assert root and not root.startswith("~"), "the remote root is resolved when the job is placed"
    return RemoteLayout(root)


@dataclass(frozen=True)
class LocalCopy:
    """The laptop's copy of a job, `<fetch.to>/<job id>/`: the final adapter and the checkpoints."""

    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def checkpoint_adapter(self, step: int) -> Path:
        return self.checkpoint(step) / CHECKPOINT_ADAPTER

    def post(self, task: str) -> Path:
        """An after-training task's fetched result: `eval/`, `export/<task>/`."""
        return self.root / "eval" if task == "eval" else self.root / "export" / post_task(task)
    # -- the job's record (client.record): kept once the instance is gone ---------------------------
    @property
    def record(self) -> Path:
        return self.root / "record"

    def record_file(self, key: str) -> Path:
        """`key` of RECORD_APPEND / RECORD_WHOLE: the same file name as on the instance."""
        return self.record / (JOB_FILES.get(key) or RECORD_FILES[key])

    @property
    def tensorboard(self) -> Path:
        return self.record / TENSORBOARD

    @property
    def swanlog(self) -> Path:
        return self.record / SWANLOG

    @property
    def report(self) -> Path:
        return self.record / REPORT

    @property
    def plots(self) -> Path:
        return self.record / "plots"


@dataclass(frozen=True)
class RemoteLayout:
    root: str

    def data_dir(self, digest: str) -> str:
        return posixpath.join(self.root, "data", digest)

    def bundle_dir(self, digest: str) -> str:
        return posixpath.join(self.root, "bundles", digest)

    def hf_home(self) -> str:
        return posixpath.join(self.root, "hf")

    def modelscope_cache(self) -> str:
        """MODELSCOPE_CACHE on the data disk (model.source = "modelscope" or "auto")."""
        return posixpath.join(self.root, "modelscope")

    @property
    def jobs_dir(self) -> str:
        return posixpath.join(self.root, "jobs")

    def job(self, job_id: str) -> JobPaths:
        return JobPaths(posixpath.join(self.root, "jobs", job_id))

    def submission(self, key: str) -> str:
        """`submissions/<key>`: the job id a submission became (one launch per key)."""
        return posixpath.join(self.root, "submissions", key)

    def submission_lock(self, key: str) -> str:
        """`submissions/<key>.lock`: a `mkdir` lock around reading and writing the submission file."""
        return self.submission(key) + ".lock"

    def setup_file(self, *names: str) -> str:
        return posixpath.join(self.root, SETUP_DIR, *names)


@dataclass(frozen=True)
class JobPaths:
    dir: str

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.dir, *parts)

    # -- written by the client ------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return self._p("job.json")

    @property
    def launch(self) -> str:
        return self._p(JOB_FILES["launch"])

    @property
    def transfer(self) -> str:
        return self._p("transfer.json")

    def lease(self, token: str) -> str:
        return self._p(LEASE_PREFIX + token)

    @property
    def fetched(self) -> str:
        return self._p("fetched.json")

    # -- written by the launcher's wrapper and the worker --------------------------------------
    @property
    def wrapper(self) -> str:
        return self._p(JOB_FILES["wrapper"])

    @property
    def events(self) -> str:
        return self._p(JOB_FILES["events"])

    @property
    def log(self) -> str:
        return self._p(JOB_FILES["log"])

    @property
    def state(self) -> str:
        return self._p(JOB_FILES["state"])

    @property
    def exit_code(self) -> str:
        return self._p(JOB_FILES["exit_code"])

    @property
    def pid(self) -> str:
        return self._p(JOB_FILES["pid"])

    @property
    def output(self) -> str:
        return self._p("output")

    @property
    def adapter(self) -> str:
        return self._p("output", "adapter")

    @property
    def checkpoints(self) -> str:
        return self._p("output", "checkpoints")

    def checkpoint(self, step: int) -> str:
        return self._p("output", "checkpoints", checkpoint_name(step))

    @property
    def trainer_state(self) -> str:
        return self._p(RECORD_FILES["trainer_state"])

    @property
    def eval_results(self) -> str:
        return self._p(RECORD_FILES["eval_results"])

    def record_file(self, key: str) -> str:
        """`key` of RECORD_APPEND / RECORD_WHOLE (jobs.layout)."""
        return self._p(JOB_FILES.get(key) or RECORD_FILES[key])

    @property
    def swanlog(self) -> str:
        """SwanLab's own log folder (all its local files; the whole run in track.swanlab_mode = "local")."""
        return self._p(SWANLOG)

    @property
    def reserve(self) -> str:
        return self._p(".reserve")

    # -- processes launched beside the job, each in a folder laid out like a job's ----------------
    @property
    def guard(self) -> JobPaths:
        """The guard's own folder, laid out like a job's (the launcher starts it the same way)."""
        return JobPaths(self._p("guard"))

    @property
    def guard_status(self) -> str:
        return self._p("guard", "status.json")

    @property
    def prefetch(self) -> JobPaths:
        """The model download's folder, laid out like a job's."""
        return JobPaths(self._p("prefetch"))

    @property
    def prefetch_result(self) -> str:
        return self._p("prefetch", "result.json")

    @property
    def post_dir(self) -> str:
        return self._p(POST_DIR)

    def post(self, task: str) -> JobPaths:
        """An after-training task's folder (`post/<task>`), laid out like a job's: the launcher starts it."""
        return JobPaths(self._p(POST_DIR, post_task(task)))

    @property
    def post_prompts(self) -> str:
        """In the eval task's folder: the prompts file the laptop sent (jsonl)."""
        return self._p("prompts.jsonl")

    @property
    def post_result(self) -> str:
        """In a task's folder: what it made, with its manifest (fetched and verified like the adapter)."""
        return self._p("result")
