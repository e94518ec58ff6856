"""Every file that crosses between the laptop and the instance, as a typed model (besides the spec,
`jobs.spec`, and the event stream, `jobs.events`).

One side writes, the other reads; both go through these models, so a field renamed on one side
fails the round-trip test (tests/test_protocol.py) instead of a job on a paid GPU. Where a file
lives is `jobs.layout`'s business; what it holds is this module's.

    file (jobs.layout)          model               written by              read by
    state                       JobState (text)     worker, wrapper         client, guard (jobs.jobstate)
    exit_code, pid              int (text)          wrapper                 client, guard
    launch.json                 LaunchRecord        client (before launch)  client (another laptop, a rerun)
    fetched.json                FetchAck            client (after verify)   guard
    fetching.<token>            (mtime only)        client (a lease)        guard
    transfer.json               TransferSpeed       client                  worker (deadline margin)
    guard/status.json           GuardStatus         guard                   client
    checkpoints/step-N/batch_shape.json  BatchShape worker                  worker (on resume)
    prefetch/result.json        ModelDownload       worker (download)       client
    .setup/deps-KEY.json        SetupMarker         client                  client (next submit)
    (stdout of envprobe)        EnvProbe            worker bundle (probe)   client (doctor, set-up)
    data/DIGEST/dataset.json    DatasetManifest     client (prepare)        worker
    .../manifest.json           FolderManifest      worker                  client (jobs.manifest)
    adapter/base_model.json     BaseModelRecord     worker                  laptop (eval/chat/export --here)
    post/eval/result/eval.json  EvalResult          worker (evaluate)       client
    post/export-*/result/export.json ExportRecord   worker (export)         client
    post/*/fetched.json         FetchAck            client (after verify)   guard
    trainer_state.json          TrainerState        worker (at each save)   client (the run report)
    eval_results.json           EvalResults         worker (each eval)      client (the run report)

Enums, not free strings, for what a program branches on: `JobState`, `GuardPhase`, `StopReason`,
`CheckpointReason`. Everything the instance writes is untrusted on the laptop: parse it with
`read_model`, which turns any malformed file into `ProtocolError` instead of a traceback.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.safepath import check_relpath


class JobState(str, Enum):
    """What a job is doing, from `jobs.jobstate.resolve` (the one rule shared by launcher, follower and guard)."""

    LAUNCHING = "launching"  # the laptop wrote launch.json and is starting it
    STARTING = "starting"  # launched, the worker has not written `running` yet
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # no outcome and no process: the instance restarted, or the process was killed
    MISSING = "missing"  # no job folder on the instance

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def finished(self) -> bool:
        """Nothing more will happen without a resume: terminal, lost or missing."""
        return self in _TERMINAL or self in (JobState.LOST, JobState.MISSING)

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
OUTCOMES = tuple(s.value for s in _TERMINAL)  # what the `state` file may end as


class StopReason(str, Enum):
    """Why a `done` job stopped: it ran to the end, or a limit stopped it early (resumable)."""

    COMPLETED = ""
    DEADLINE = "deadline"
    MAX_HOURS = "max_hours"

    def __str__(self) -> str:
        return self.value


class CheckpointReason(str, Enum):
    STEPS = "steps"
    TIMER = "timer"
    DEADLINE = "deadline"
    MAX_HOURS = "max_hours"
    SIGNAL = "signal"
    UNKNOWN = ""

    def __str__(self) -> str:
        return self.value


class GuardPhase(str, Enum):
    """What the guard (remote_worker.guard) is doing; `guard/status.json` says it."""

    WATCHING = "watching"  # the job runs
    WAITING = "waiting"  # the job ended: waiting for a fetch, a resume or the grace period
    EXITED = "exited"  # nothing to do (policy "never"); another job's guard decides
    SHUTTING_DOWN = "shutting down"
    SHUT_DOWN = "shut down"
    SHUTDOWN_FAILED = "shutdown failed"
    NOT_SHUT_DOWN = "not shut down"  # the default command is unsafe on a host that is not AutoDL

    @property
    def acted(self) -> bool:
        """The guard is done deciding: the laptop can report what it did."""
        return self not in (GuardPhase.WATCHING, GuardPhase.WAITING)

    def __str__(self) -> str:
        return self.value


class _File(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class LaunchRecord(_File):
    """`launch.json`: written by the client before it starts the worker; the instance's own record of
    the job's identity, so a rerun of `submit` (from any laptop) finds it instead of launching twice."""

    job_id: str
    name: str
    submit_key: str = Field(description="sha256 of the spec and the data digest: the same submission")
    data_digest: str = Field(pattern=r"^[0-9a-f]{1,64}$")  # hex: it becomes a remote path
    bundle_digest: str = Field(pattern=r"^[0-9a-f]{1,64}$")
    job_file: str = ""
    spec_json: str = Field("", description="the resolved spec, to rebuild a laptop ledger from the instance")
    at: float = Field(default_factory=time.time)


class FetchAck(_File):
    """`fetched.json`: the laptop holds this adapter, verified. Says nothing about the laptop itself."""

    what: Literal["adapter", "checkpoint", "eval", "export"] = "adapter"
    manifest_sha256: str
    step: int | None = None
    at: float = Field(default_factory=time.time)


class TransferSpeed(_File):
    """`transfer.json`: how fast the laptop downloads from this instance (the worker's deadline margin)."""

    bytes_per_s: float = Field(gt=0)
    bytes: int = 0
    seconds: float = 0.0
    at: float = Field(default_factory=time.time)


class GuardStatus(_File):
    """`guard/status.json`."""

    phase: GuardPhase
    policy: str
    reason: str = ""
    message: str = ""
    shutdown_at: float | None = Field(None, description="unix time it shuts down unless a fetch comes first")
    copied_to: str | None = None
    command: str | None = None
    command_rc: int | None = None
    t: float = Field(default_factory=time.time)


class BatchShape(_File):
    """`batch_shape.json` in a checkpoint: the micro-batch the run chose (a resume keeps it)."""

    micro_batch_tokens: int = Field(gt=0)
    gradient_checkpointing: bool
    # The processes that trained it and the micro-batches per optimizer step (0: from before these were saved).
    world_size: int = Field(1, ge=1)
    grad_accum: int = Field(0, ge=0)
    # with checkpointing: only the first this many decoder layers (partial checkpointing); None: all
    checkpointed_layers: int | None = Field(default=None, ge=0)
    # which sequences share a micro-batch (jobs.packing); checkpoints from before it was saved: next-fit
    packer: Literal["best_fit", "next_fit"] = "next_fit"


class ModelDownload(_File):
    """`prefetch/result.json`: what the model download on the instance did."""

    ok: bool
    kind: str = ""  # on failure: "disk", "auth", "network", ...
    message: str = ""
    hint: str = ""
    path: str = ""
    bytes: int = 0  # downloaded this time
    model_bytes: int = 0  # the model's files (on a disk refusal: those still to download)
    seconds: float = 0.0
    cached: bool = False  # every file was already in HF_HOME (or the ModelScope cache)
    revision: str = ""
    source: str = ""  # the hub it came from: "hf" or "modelscope" (jobs.modelsource)
    repo: str = ""  # the id on that hub (a ModelScope org can differ from the Hugging Face one)
    endpoint: str = ""


class SetupMarker(_File):
    """`.setup/deps-KEY.json`: this python had the worker's requirements when last checked."""

    python: str
    executable: str | None = None
    torch: str | None = None
    requirements: list[str] = Field(default_factory=list)
    checked_at: str = ""


class TorchGpu(_File):
    name: str
    memory_gb: float = 0.0


class EnvProbe(_File):
    """What `python -m remote_worker.envprobe` prints (one line, stdout): the instance's python.

    The probe runs before set-up installs anything, so it writes this with the standard library;
    the laptop parses it with this model."""

    python: str  # its version
    executable: str
    packages: dict[str, str | None] = Field(default_factory=dict)  # distribution -> version (None: absent)
    missing: list[str] = Field(default_factory=list)  # import names of the requirements asked about
    outdated: dict[str, str] = Field(default_factory=dict)  # import name -> the too-old installed version
    flash_attn_importable: bool = False
    torch: str | None = None
    torch_cuda: str | None = None  # with --torch: torch's CUDA build, and what it sees
    cuda_available: bool = False
    gpus: list[TorchGpu] = Field(default_factory=list)
    torch_error: str | None = None


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        return check_relpath(v)


class FolderManifest(BaseModel):
    """`manifest.json` beside an adapter or a checkpoint: every other file, sha256 (jobs.manifest)."""

    model_config = ConfigDict(extra="ignore")
    version: int = 1
    files: list[ManifestEntry]


class DatasetManifest(_File):
    """`dataset.json` in a prepared dataset folder (client.dataset writes it, remote_worker.data reads it)."""

    format_version: int
    digest: str
    created_unix: float = 0.0
    counts: dict[str, int] = Field(default_factory=dict)
    max_length: int | None = None
    overlong: str = ""
    overlong_applied: bool = False
    tokenizer_fingerprint: str | None = None
    tokenizer: dict[str, Any] | None = None
    tokens: dict[str, Any] | None = Field(None, description="the pre-tokenized files, when the laptop had the tokenizer")
    report: dict[str, Any] = Field(default_factory=dict)
    chat_template: str | None = Field(
        None, description="the chat template conversations were rendered with when the tokenizer has none "
        "(jobs.tokenize.PLAIN_TEMPLATE); the worker saves it into the adapter's tokenizer"
    )


class BaseModelRecord(_File):
    """`base_model.json` in an adapter: the base it was trained on, by a name the laptop can resolve
    (`name`, also adapter_config.json's base_model_name_or_path) and where it was on the instance."""

    name: str
    instance_path: str = ""
    revision: str | None = None


class EvalScores(_File):
    loss: float | None = None  # mean over the references' tokens (held-out)
    exact_match: float | None = None  # share of answers equal to the reference (after trimming)
    rouge_l: float | None = None  # mean ROUGE-L F1 (rouge-score; CJK split by character)


class EvalSample(_File):
    prompt: str
    reference: str | None = None
    base: str
    tuned: str
    base_rouge_l: float | None = None
    tuned_rouge_l: float | None = None


class EvalResult(_File):
    """`post/eval/result/eval.json`: the base and the tuned model side by side on held-out prompts."""

    base_model: str
    prompts_from: str
    max_new_tokens: int
    device: str = ""
    base: EvalScores = Field(default_factory=EvalScores)
    tuned: EvalScores = Field(default_factory=EvalScores)
    samples: list[EvalSample] = Field(default_factory=list)
    seconds: float = 0.0


class MergeCheck(_File):
    """Merged logits against base + adapter (PEFT, unmerged) on the same inputs."""

    dtype: str
    max_abs_diff: float  # merged vs PEFT
    lora_effect: float  # PEFT vs the base alone: what a merge that lost the LoRA would differ by
    tolerance: float
    passed: bool


class GgufCheck(_File):
    """The GGUF file read back (dequantized) against the merged model: its weights tensor by tensor, and
    the logits of the check texts."""

    qtype: str
    max_abs_diff: float
    rel_l2: float  # logits: ||gguf - merged|| / ||merged||
    top1_agree: float
    tolerance: float  # of rel_l2; it decides only for a float32 model (16-bit compute adds its own error)
    passed: bool
    weight_rel_l2: float = 0.0  # the worst tensor's ||gguf - merged|| / ||merged||
    weight_tensor: str = ""  # which one
    weight_tolerance: float = 0.0


class ExportRecord(_File):
    """`post/export-*/result/export.json`: what an export made and how it was checked."""

    kind: Literal["merged", "gguf", "ollama"]
    base_model: str
    merged_onto: str = ""  # "16-bit base" (never the dequantized nf4 weights: docs/export.md)
    qtype: str = ""
    files: list[str] = Field(default_factory=list)
    merge_check: MergeCheck | None = None
    gguf_check: GgufCheck | None = None
    seconds: float = 0.0
    phases: dict[str, float] = Field(default_factory=dict)  # seconds: load, merge, convert, quantize, write, check
Number = float | int | None


class TrainerState(_File):
    """`trainer_state.json`: transformers' TrainerState, as much of it as the run report reads."""

    global_step: int
    max_steps: int = 0
    log_history: list[dict[str, Number | str]] = Field(default_factory=list)


class EvalPoint(BaseModel):
    """One evaluation during training: the trainer's step and its metrics (eval_loss, ...)."""

    step: int
    metrics: dict[str, Number]


class EvalResults(_File):
    """`eval_results.json`: every evaluation of the run, in order."""

    results: list[EvalPoint]


class ProtocolError(ValueError):
    """A crossing file did not match its model: says which file and what was wrong."""


M = TypeVar("M", bound=BaseModel)


def read_model(model: type[M], text: str | bytes, where: str = "") -> M:
    """Parse one crossing file; ProtocolError (naming `where`) for anything malformed."""
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        loc = ".".join(str(p) for p in first.get("loc", ())) or "(the whole file)"
        raise ProtocolError(f"{where or model.__name__}: {loc}: {first.get('msg')}") from None


def dump_model(obj: BaseModel) -> str:
    """The one way a crossing file is written: JSON, one object, newline-terminated."""
    return json.dumps(obj.model_dump(mode="json"), indent=1, ensure_ascii=False) + "\n"


__all__ = [
    "BaseModelRecord", "EvalResult", "EvalSample", "EvalScores", "ExportRecord", "GgufCheck", "MergeCheck",
    "BatchShape", "CheckpointReason", "DatasetManifest", "EnvProbe", "EvalPoint", "EvalResults", "FetchAck",
    "FolderManifest", "GuardPhase",
    "GuardStatus", "JobState", "LaunchRecord", "ManifestEntry", "ModelDownload", "OUTCOMES", "ProtocolError",
    "SetupMarker", "StopReason", "TorchGpu", "TrainerState", "TransferSpeed", "dump_model", "read_model",
]
