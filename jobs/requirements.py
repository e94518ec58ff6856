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
    "pydantic": "pydantic>=2.6",
}
# Needed only for 4-bit (QLoRA) jobs.
QLORA_REQUIREMENTS: dict[str, str] = {"bitsandbytes": "bitsandbytes>=0.45"}


def requirements_for(bits: int) -> dict[str, str]:
    return {**WORKER_REQUIREMENTS, **(QLORA_REQUIREMENTS if bits == 4 else {})}
