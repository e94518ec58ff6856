"""The job spec: what `job.toml` may say, validated by pydantic.

Both sides import this module: the client loads and checks `job.toml`; the worker
reads the resolved spec (`job.json`) that the client uploads next to the data.
Unknown keys are rejected everywhere (`extra="forbid"`), so a typo is an error,
not a silently ignored setting.
"""

from __future__ import annotations

import re
import shlex
import sys
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_validator

from jobs import autodl

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOCAL_HOST = "local"
AUTODL_DATA_DISK_ROOT = autodl.REMOTE_ROOT


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InstanceSpec(_Strict):
    """Where the job runs: `host = "local"`, an AutoDL login command, or host/port/user."""

    ssh: str | None = Field(None, description='the login command as AutoDL shows it: "ssh -p PORT root@HOST"')
    host: str | None = None
    port: int = Field(22, ge=1, le=65535)
    user: str = "root"
    profile: str | None = Field(None, description="a host profile saved by `autodl-run login`")
    identity_file: str | None = None
    remote_root: str | None = Field(
        None, description=f"state on the instance; default {autodl.REMOTE_ROOT} (local: $AUTODL_RUN_HOME/local)"
    )
    python: str | None = Field(
        None, description='the interpreter on the instance; default "python3" (local: the python running autodl-run)'
    )
    connect_timeout: float = Field(15.0, gt=0, le=300)
    tmux_socket: str = Field("autodl-run", description="tmux -L socket name on the instance")
    price_per_hour: float | None = Field(None, ge=0, description="CNY an hour, for the spend shown by tail/status")
    currency: str = "CNY"
    install_deps: bool = Field(True, description="pip-install the worker's missing packages on the instance")
    pip_index_url: str | None = None
    hf_endpoint: str | None = Field(None, description=f"a Hugging Face mirror, e.g. {autodl.HF_MIRROR}")
    network_turbo: bool = Field(False, description=f"source {autodl.NETWORK_TURBO} (AutoDL's proxy) for downloads only")
    # Deadlines and shutdown (never lose an adapter, never pay for an idle GPU).
    expires_at: datetime | None = Field(None, description="when the instance goes away; the job stops in time to save and fetch")
    max_hours: float | None = Field(None, gt=0, description="a hard limit on the job's run time: save and stop")
    shutdown_after: Literal["fetched", "done", "never"] | None = Field(
        None, description='what the guard does when the job ends; default "fetched" ("never" for host = "local")'
    )
    shutdown_command: str = Field(autodl.SHUTDOWN, description="stops AutoDL billing when run on the instance")
    idle_grace_minutes: float = Field(60, ge=0, description="how long the guard waits for the fetch before shutting down")
    # More than one machine (docs/multigpu.md): this instance is node 0; each of `hosts` is one more node.
    hosts: list[str] = Field(
        default_factory=list,
        description='more nodes, each an ssh login command ("ssh -p PORT root@HOST"); they must reach this one',
    )
    rdzv_host: str | None = Field(
        None, description="the address the other nodes reach this one at (torchrun's rendezvous); default: host"
    )
    rdzv_port: int = Field(29400, ge=1, le=65535, description="torchrun's c10d rendezvous port on this instance")
    node_timeout_s: float = Field(
        300, ge=5, description="nodes 1, 2, ... stop when node 0's rendezvous port has not answered for this long "
        "(its host down or unreachable), instead of waiting in a collective",
    )

    @field_validator("remote_root")
    @classmethod
    def _absolute_root(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not (v.startswith("/") or v.startswith("~")):
            raise ValueError(f"must be an absolute path on the instance, e.g. {autodl.REMOTE_ROOT}")
        return v.rstrip("/") or "/"

    @field_validator("ssh")
    @classmethod
    def _parsable_login(cls, v: str | None) -> str | None:
        if v is not None:
            parse_ssh_command(v)
        return v

    @field_validator("hosts")
    @classmethod
    def _parsable_hosts(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for login in v:
            parse_ssh_command(login)
        have = info.data
        # node 0 on this machine: the other nodes could not reach its rendezvous, nor be launched by it
        if v and {"ssh", "host", "profile"} <= have.keys() and have["ssh"] is None and have["profile"] is None \
                and have["host"] in (None, LOCAL_HOST):
            raise ValueError('more nodes need an SSH instance as node 0, not host = "local": set instance.ssh '
                             '(or host/port/user) to node 0\'s login, or remove instance.hosts')
        return v

    @field_validator("tmux_socket")
    @classmethod
    def _socket_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use letters, digits, '-', '_' and '.' only")
        return v

    @model_validator(mode="after")
    def _one_way_to_connect(self) -> InstanceSpec:
        if self.ssh is not None:
            host, port, user, identity = parse_ssh_command(self.ssh)
            if self.host is not None and self.host != host:
                raise ValueError("give either `ssh` (the login command) or `host`, not both")
            object.__setattr__(self, "host", host)
            object.__setattr__(self, "port", port)
            object.__setattr__(self, "user", user or self.user)
            if identity and not self.identity_file:
                object.__setattr__(self, "identity_file", identity)
        if self.host is None and self.profile is None:
            object.__setattr__(self, "host", LOCAL_HOST)
        if self.hosts and self.host is None and self.rdzv_host is None:
            # a profile's host is known only to the laptop's profile store: the other nodes got "" to meet at
            raise ValueError("instance.hosts with a profile needs instance.rdzv_host: node 0's address as "
                             "the other nodes reach it")
        if self.python is None:
            # On the local target a login shell's PATH may not lead to this virtualenv's python.
            object.__setattr__(self, "python", sys.executable if self.is_local else "python3")
        return self

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL_HOST and self.profile is None

    @property
    def shutdown_policy(self) -> str:
        if self.shutdown_after is not None:
            return self.shutdown_after
        return "never" if self.is_local else "fetched"

    def describe(self) -> str:
        if self.is_local:
            return "local"
        if self.profile and not self.host:
            return f"profile {self.profile}"
        return f"{self.user}@{self.host}:{self.port}"


def parse_ssh_command(command: str) -> tuple[str, int, str | None, str | None]:
    """Parse `ssh -p PORT user@host` (also `-i KEY`, `-o Port=N`) into (host, port, user, identity).

    Anything else is rejected, because silently dropping an option the user relied on
    would connect somewhere they did not mean.
    """
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"cannot parse the ssh command: {exc}") from None
    if not words or words[0] != "ssh":
        raise ValueError('must start with "ssh", e.g. "ssh -p 38076 root@region-41.autodl.com"')
    port, identity, target = 22, None, None
    i = 1
    while i < len(words):
        w = words[i]
        if w in ("-p", "-i", "-o"):
            if i + 1 >= len(words):
                raise ValueError(f"`{w}` needs a value")
            value = words[i + 1]
            if w == "-p":
                port = _port(value)
            elif w == "-i":
                identity = value
            else:
                key, _, val = value.partition("=")
                if key.strip().lower() != "port":
                    raise ValueError(f"unsupported ssh option `-o {value}`; only -o Port=N is understood")
                port = _port(val.strip())
            i += 2
            continue
        if w.startswith("-p") and w[2:].isdigit():
            port = _port(w[2:])
        elif w.startswith("-"):
            raise ValueError(f"unsupported ssh option `{w}`; use -p PORT, -i KEY or -o Port=N")
        elif target is None:
            target = w
        else:
            raise ValueError(f"unexpected word `{w}`: give only the login command, no remote command")
        i += 1
    if target is None:
        raise ValueError("no host in the ssh command, expected user@host")
    user, _, host = target.rpartition("@")
    if not host:
        raise ValueError("no host in the ssh command, expected user@host")
    return host, port, user or None, identity


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"bad port `{value}`")
    return int(value)


DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"]


class DataSpec(_Strict):
    train: str | list[str] = Field(..., description="file(s) or globs on the laptop, relative to the job file")
    eval: str | list[str] | None = None
    format: DataFormat = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict, description='rename fields, e.g. {instruction = "question", output = "answer"}'
    )
    system_prompt: str | None = Field(None, description="a system message added to rows that have none")
    max_length: int = Field(2048, ge=16, le=1_048_576)
    overlong: Literal["drop", "truncate", "fail"] = "drop"
    on_error: Literal["fail", "skip"] = "fail"
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 42
    dedupe: bool = True
    train_template_text: bool = Field(
        False, description="also train the text a chat template writes around a reply (role headers, an empty think block)"
    )

    def train_list(self) -> list[str]:
        return [self.train] if isinstance(self.train, str) else list(self.train)

    def eval_list(self) -> list[str]:
        if self.eval is None:
            return []
        return [self.eval] if isinstance(self.eval, str) else list(self.eval)


class ModelSpec(_Strict):
    name_or_path: str = Field(..., description="hub id, or a path on the instance")
    tokenizer: str | None = Field(None, description="a tokenizer path on the laptop, for token statistics")
    revision: str | None = None
    trust_remote_code: bool = Field(False, description="run the model repo's own Python code (GLM4 needs it)")
    source: Literal["auto", "hf", "modelscope"] = Field(
        "auto",
        description="where the instance downloads a hub id from: ModelScope for the orgs it mirrors (Qwen, GLM, "
        "DeepSeek, ...) then a Hugging Face mirror (auto), only Hugging Face (hf), only ModelScope (modelscope)",
    )


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class QuantSpec(_Strict):
    bits: Literal[4, 16] = 4


class TrainSpec(_Strict):
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(0, ge=0, description="> 0 overrides epochs")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    micro_batch_tokens: int = Field(
        0,
        ge=0,
        description="tokens in one packed micro-batch; 0 = measured on the GPU before training "
        "(the fastest of 16384/8192/4096 that fits), max_length on CPU",
    )
    global_batch_tokens: int = Field(0, ge=0, description="tokens per optimizer step; 0 = one micro-batch")
    global_batch_sequences: int = Field(
        0,
        ge=0,
        description="sequences per optimizer step (LLaMA-Factory's per_device_train_batch_size x "
        "gradient_accumulation_steps x GPUs), instead of global_batch_tokens: times the train set's mean "
        "sequence length in tokens; 0 = not set",
    )
    packing: bool = Field(True, description="padding-free packing with per-sequence position_ids")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description='"auto" = measured on the GPU with the micro-batch (off where it fits and is faster); off on CPU'
    )
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps; 0 = only on the timer and at the end")
    save_every_minutes: float = Field(15, ge=0)
    seed: int = 42
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Speed switches (docs/benchmarks.md measures each); "auto" uses a path only where it is installed and checked.
    attention: Literal["auto", "flash_varlen", "flash_attention_2", "sdpa"] = "auto"
    liger: Literal["auto", "on", "off"] = "auto"
    fused_lora: bool = Field(True, description="fused LoRA forward/backward where supported (no dropout, no DoRA)")
    # More than one GPU (docs/multigpu.md): the worker runs under torchrun, one process per GPU.
    gpus: StrictInt | Literal["all"] = Field(
        1, description='GPUs (processes) per node: 1, N or "all" (CUDA only); on the CPU, a number of processes'
    )
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description='"ddp" (each GPU holds the 4-bit model), "fsdp" (sharded QLoRA), "auto" by a memory estimate'
    )

    @field_validator("gpus")
    @classmethod
    def _some_gpus(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError('must be 1 or more, or "all"')
        return v

    @property
    def multi_process(self) -> bool:
        return self.gpus != 1

    @model_validator(mode="after")
    def _one_global_batch(self) -> TrainSpec:
        if self.global_batch_tokens and self.global_batch_sequences:
            raise ValueError("give global_batch_tokens or global_batch_sequences, not both")
        if self.gpus == "all" and self.device == "cpu":
            # torchrun's "auto" is one process per CPU core there: 128 copies of the model on a large host
            raise ValueError('gpus = "all" counts GPUs; with device = "cpu" give a number of processes, e.g. gpus = 2')
        return self


class EvalSpec(_Strict):
    """`[eval]`: generations of the base and the tuned model on held-out prompts (remote_worker.evaluate)."""

    prompts: str | None = Field(None, description="a prompts file on the laptop (jsonl or txt); default: the eval split")
    max_new_tokens: int = Field(256, ge=1, le=32768)
    limit: int = Field(50, ge=1, description="at most this many prompts")
    at_end: bool = Field(False, description="run it on the instance when training ends, before the guard may shut down")


class FetchSpec(_Strict):
    to: str = Field("runs", description="where adapters land on the laptop, relative to the job file")


class TrackSpec(_Strict):
    """Experiment trackers beside the TensorBoard files every job writes (transformers' own integrations)."""

    report_to: list[Literal["swanlab", "wandb"]] = Field(
        default_factory=list, description="trackers the worker also reports to; one that cannot connect only warns"
    )
    project: str | None = Field(None, description="the tracker's project (default: the job's name)")
    swanlab_mode: Literal["cloud", "local"] = Field("cloud", description="local: SwanLab logs under the job folder")
    network_turbo: bool = Field(
        True, description=f"on AutoDL, tracker uploads go through {autodl.NETWORK_TURBO} (set after the model is loaded)"
    )


class JobSpec(_Strict):
    name: str
    instance: InstanceSpec = Field(default_factory=InstanceSpec)
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    fetch: FetchSpec = Field(default_factory=FetchSpec)
    eval: EvalSpec | None = None
    track: TrackSpec = Field(default_factory=TrackSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")
        return v


class WorkerJob(_Strict):
    """What the client uploads as `job.json`: the spec plus where this job's things are."""

    job_id: str
    spec: JobSpec
    data_dir: str = Field(..., description="the prepared dataset on the instance (jobs.layout)")
    job_dir: str
    hf_home: str | None = None
    deadline_unix: float | None = None
