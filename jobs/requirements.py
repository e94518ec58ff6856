"""What the worker needs on the instance: import name -> pip requirement.

The client checks these in one round trip before launching and installs what is missing
(never touching the instance's torch); the worker imports them.
"""

WORKER_REQUIREMENTS: dict[str, str] = {
    "torch": "torch>=2.4",
    "transformers": "transformers>=5.0",
    "peft": "peft>=0.17",
    "accelerate": "accelerate>=1.0",
    "safetensors": "safetensors>=0.4",
    "numpy": "numpy>=1.24",
    "pydantic": "pydantic>=2.11",
}
# Needed only for 4-bit (QLoRA) jobs.
QLORA_REQUIREMENTS: dict[str, str] = {"bitsandbytes": "bitsandbytes>=0.45"}
# Needed only when the model is downloaded from ModelScope (model.source, jobs.modelsource).
MODELSCOPE_REQUIREMENTS: dict[str, str] = {"modelscope": "modelscope>=1.18"}


# Optional, CUDA only, never required: set-up does not install it (pip install it on the instance to
# use it). Where it is missing or fails to import, its speed path is off (remote_worker.fast reports
# which paths are on in the `started` event).
# liger-kernel: Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) used by
# train.liger = "auto"; it pulls Triton, which CUDA builds of torch already ship.
OPTIONAL_CUDA_REQUIREMENTS: dict[str, str] = {"liger_kernel": "liger-kernel>=0.8.5"}  # the version measured


def requirements_for(bits: int, modelscope: bool = False) -> dict[str, str]:
    """What the worker cannot run without (the optional extras are not in it).

    `modelscope`: the model may come from ModelScope (jobs.modelsource.uses_modelscope)."""
    return {
        **WORKER_REQUIREMENTS,
        **(QLORA_REQUIREMENTS if bits == 4 else {}),
        **(MODELSCOPE_REQUIREMENTS if modelscope else {}),
    }


def optional_requirements_for(liger: str = "auto") -> dict[str, str]:
    """The extras worth trying to install for a job (train.liger = "off" needs none)."""
    return {} if liger == "off" else dict(OPTIONAL_CUDA_REQUIREMENTS)


# After training (remote_worker.evaluate, remote_worker.export): checked and installed when `eval` or
# `export` runs on the instance, not by the training set-up.
POST_REQUIREMENTS: dict[str, str] = {"gguf": "gguf>=0.17", "rouge_score": "rouge-score>=0.1.2"}
