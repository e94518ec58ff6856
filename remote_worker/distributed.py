"""More than one process: which rank this is, and the few things all ranks must agree on.

torchrun (torch.distributed.run) starts one worker process per GPU (per CPU process with
train.device = "cpu") and sets RANK, LOCAL_RANK, WORLD_SIZE; one process alone has none of them
and every function here is then a no-op. The Trainer (accelerate) trains data-parallel (DDP) or
sharded (FSDP) over the process group initialised here: NCCL on CUDA, gloo on the CPU.

What ranks agree on, each by one small collective at the same point of every rank's run:
- the micro-batch shape: rank 0's calibration is taken by all (`agree`);
- when to stop and when the timer saves: the most urgent of every rank's view (`most`), once a
  step, so no rank stops alone and leaves the others waiting in a collective;
- the aggregate tokens/s and each rank's peak memory for rank 0's one event stream (`gather`).

Rank 0 alone writes events, state and checkpoints; the others wait at the same barriers.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass
from typing import Any

from jobs import memory

DDP, FSDP, NONE = "ddp", "fsdp", "none"
# The share of a card's memory the 4-bit weights may take for data-parallel; above it, FSDP.
DDP_WEIGHT_SHARE = memory.DDP_WEIGHT_SHARE  # 0.6, shared with `autodl-run plan`


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def multi(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from torchrun's environment (one process alone: rank 0 of 1)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def init(setting: str) -> World:
    """Join the process group (when under torchrun) and pin this rank's GPU, before anything touches
    GPU 0 (train.device: "auto", "cuda", "cpu"). Idempotent."""
    w = world()
    if not w.multi:
        return w
    _die_with_parent()
    import torch
    import torch.distributed as dist

    device = "cpu" if setting == "cpu" or not torch.cuda.is_available() else "cuda"

    if device == "cuda":
        torch.cuda.set_device(w.local_rank)
        if cap_bytes():  # before the model loads: FSDP skips the calibration that would set it
            total = torch.cuda.mem_get_info()[1]
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes() / total))
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": torch.device("cuda", w.local_rank)} if device == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return w


def cap_bytes() -> int | None:
    """AUTODL_RUN_GPU_MEMORY_GB (remote_worker.calibrate): the memory each rank may use."""
    try:
        return int(float(os.environ.get("AUTODL_RUN_GPU_MEMORY_GB", "")) * 1e9) or None
    except ValueError:
        return None


def device_of(device: str) -> str:
    """Where this rank's copy of the model goes: its own GPU, or the CPU."""
    return f"cuda:{world().local_rank}" if device == "cuda" and world().multi else device


def _die_with_parent() -> None:
    """torchrun starts each rank in a session of its own, out of reach of the job's process group:
    a rank whose torchrun agent died (killed by `cancel` after its grace) must not train on alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: torchrun's own shutdown still stops the ranks
        pass
    if os.getppid() == 1:  # the agent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _device():
    import torch

    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def agree(value: Any) -> Any:
    """Rank 0's value, on every rank (a small picklable object)."""
    dist = _dist()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def most(values: list[int]) -> list[int]:
    """The element-wise maximum of every rank's small integers."""
    dist = _dist()
    if dist is None:
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(x) for x in t.tolist()]


def gather(value: float) -> list[float]:
    """Every rank's float, in rank order, on every rank."""
    dist = _dist()
    if dist is None:
        return [value]
    import torch

    t = torch.tensor([value], dtype=torch.float64, device=_device())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def finish() -> None:
    dist = _dist()
    if dist is not None:
        try:
            dist.destroy_process_group()
        except Exception:  # tearing down after a failure: the exit code already tells
            pass


# --- data-parallel or sharded ---------------------------------------------------------------------


weight_bytes = memory.card_weight_bytes  # the base model's weights on one card (jobs.memory, the plan's rule too)


def choose(setting: str, w: World, params: int, bits: int, card_bytes: int | None) -> str:
    """"none" for one process; the spec's "ddp"/"fsdp"; for "auto": DDP when the weights take at
    most DDP_WEIGHT_SHARE of one card (the rest is activations and the LoRA optimizer), else FSDP."""
    if not w.multi:
        return NONE
    if setting in (DDP, FSDP):
        return setting
    if not card_bytes:  # the CPU: every process holds the model
        return DDP
    return DDP if weight_bytes(params, bits) <= DDP_WEIGHT_SHARE * card_bytes else FSDP


def prepare_loading(mode: str) -> None:
    """FSDP: tell transformers, before the model is loaded, that accelerate will shard it, so rank 0
    alone reads the weights and the others start empty (cpu_ram_efficient_loading)."""
    if mode == FSDP:
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"


def trainer_arguments(mode: str, layer_classes: list[str], device: str = "cuda") -> dict[str, Any]:
    """The TrainingArguments that make the Trainer train data-parallel or sharded."""
    if mode == DDP:
        # every LoRA weight takes part in every step: no search for unused ones (a full graph walk a step)
        return {"ddp_find_unused_parameters": False}
    if mode == FSDP:
        return {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                # FSDP1 with use_orig_params is the FSDP-QLoRA path bitsandbytes and peft document;
                # AUTODL_RUN_FSDP_VERSION=2 tries FSDP2 (transformers' default; the only one on the CPU)
                "version": int(os.environ.get("AUTODL_RUN_FSDP_VERSION", "1" if device == "cuda" else "2")),
                "transformer_layer_cls_to_wrap": layer_classes,  # one decoder layer a unit
                "use_orig_params": True,  # frozen 4-bit and trainable LoRA weights in one unit (FSDP1)
                "cpu_ram_efficient_loading": True,
                "sync_module_states": True,
                "state_dict_type": "FULL_STATE_DICT",  # checkpoints and the adapter as one ordinary file
            },
        }
    return {}
