"""What this machine offers the recipe: device, training dtype, attention implementation, versions.

`python -m remote_worker.probe` prints it as JSON. What the instance's python has before a job
(doctor, set-up) is remote_worker.envprobe.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass

from remote_worker import DeviceError
from remote_worker.envprobe import version

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "safetensors",
    "numpy",
    "flash-attn",
    "liger-kernel",
    "triton",
)


@dataclass(frozen=True)
class Probe:
    device: str  # "cuda" or "cpu"
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3", or "cpu"
    bf16: bool  # the GPU computes in bfloat16
    dtype: str  # the training dtype: "bfloat16", "float16" (GPUs without bf16) or "float32" (CPU)
    attention: str  # "flash_attention_2" when flash_attn imports, else "sdpa" (before train.attention)
    versions: dict[str, str | None]
    # torch has the flash varlen kernel and this is a 16-bit CUDA machine. Whether the recipe uses it
    # is decided per model, after a self-check (remote_worker.fast.choose; the `started` event says).
    flash_varlen: bool = False

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def as_dict(self) -> dict:
        return asdict(self)


def versions() -> dict[str, str | None]:
    """Installed versions (None = not installed), read from package metadata without importing."""
    return {"python": platform.python_version()} | {name: version(name) for name in PACKAGES}


def attention_implementation(device: str, dtype: str) -> str:
    """flash_attention_2 only where it can run (CUDA, 16-bit) and `flash_attn` really imports.

    flash-attn ships only an sdist that takes hours to build (shared/anchors.md), so most
    instances lack it; SDPA is the fallback. Both respect packed sequences: SDPA through the
    block-diagonal mask transformers builds from position_ids, FA2 through its varlen path.
    """
    if device != "cuda" or dtype == "float32":
        return "sdpa"
    from remote_worker.fast import flash_attn_importable

    return "flash_attention_2" if flash_attn_importable() else "sdpa"


def probe(device: str = "auto") -> Probe:
    """Resolve train.device ("auto", "cuda", "cpu") and what goes with it."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise DeviceError(
            'train.device = "cuda" but torch sees no GPU',
            hint=f"check `nvidia-smi` on the instance and that torch {torch.__version__} is a CUDA build",
        )
    if device == "cpu" or not cuda:
        return Probe("cpu", "cpu", False, "float32", "sdpa", versions())
    bf16 = torch.cuda.is_bf16_supported()
    dtype = "bfloat16" if bf16 else "float16"
    from remote_worker.fast import varlen

    return Probe(
        "cuda", torch.cuda.get_device_name(), bf16, dtype, attention_implementation("cuda", dtype), versions(),
        flash_varlen=varlen.available() is None,
    )


if __name__ == "__main__":
    print(json.dumps(probe().as_dict(), indent=1))
