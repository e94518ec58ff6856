"""Where a hub id is downloaded from (model.source): ModelScope, a Hugging Face mirror, or one then the other.

Both sides read it: the worker's download (remote_worker.prefetch) tries the hubs in `candidates` order,
and set-up (client.remote.setup) installs the `modelscope` library only when ModelScope is among them.
"""

from __future__ import annotations

# Hugging Face org -> its namespace on ModelScope, for the orgs that publish there themselves (the
# models AutoDL users fine-tune). Under "auto" a name that is not there falls back to Hugging Face,
# so a model published under another name (some LLM-Research repos) costs one listing, not a failure.
MODELSCOPE_ORGS = {
    "Qwen": "Qwen",
    "deepseek-ai": "deepseek-ai",
    "THUDM": "ZhipuAI",  # GLM-4, ChatGLM
    "zai-org": "ZhipuAI",  # GLM-4.5 and later
    "meta-llama": "LLM-Research",  # ModelScope's mirror of the Llama models
    "internlm": "Shanghai_AI_Laboratory",
}
HF = "hf"
MODELSCOPE = "modelscope"


def candidates(source: str, name: str, revision: str | None = None) -> list[tuple[str, str]]:
    """(hub, id on that hub) to try in order for `model.name_or_path` = `name` under `model.source`."""
    if source == HF:
        return [(HF, name)]
    if source == MODELSCOPE:
        return [(MODELSCOPE, name)]
    org, _, rest = name.partition("/")
    # a Hugging Face revision (a commit, a branch) means nothing on ModelScope
    if org in MODELSCOPE_ORGS and rest and revision in (None, "main", "master"):
        return [(MODELSCOPE, f"{MODELSCOPE_ORGS[org]}/{rest}"), (HF, name)]
    return [(HF, name)]


def uses_modelscope(source: str, name: str, revision: str | None = None) -> bool:
    return any(hub == MODELSCOPE for hub, _ in candidates(source, name, revision))
