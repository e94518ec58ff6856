"""Finding the model's tokenizer on the laptop, offline. Never a download.

Tried in order:
  1. `model.tokenizer`: a tokenizer folder, or a .gguf file (relative to the job file);
  2. `model.name_or_path`, when it is a local folder;
  3. the local Hugging Face cache (`local_files_only=True`, HF_HUB_OFFLINE=1).
A folder without tokenizer files but with exactly one .gguf file is loaded from that file.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from client.errors import DatasetError, Problem
from jobs.spec import ModelSpec

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerNotFound(Exception):
    pass


@contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_local(path: Path, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer from a local folder or .gguf file; raise TokenizerNotFound."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if path.is_file():
        if path.suffix != ".gguf":
            raise TokenizerNotFound(f"{path} is a file; give a tokenizer folder or a .gguf file")
        where, kwargs["gguf_file"] = path.parent, path.name
    elif path.is_dir():
        where = path
        if not any((path / f).exists() for f in _TOKENIZER_FILES):
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise TokenizerNotFound(f"{path} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
            kwargs["gguf_file"] = ggufs[0].name
    else:
        raise TokenizerNotFound(f"{path} does not exist")
    try:
        with _offline():
            return AutoTokenizer.from_pretrained(str(where), **kwargs)
    except Exception as exc:
        raise TokenizerNotFound(f"cannot load a tokenizer from {path}: {type(exc).__name__}: {exc}") from None


def find_tokenizer(model: ModelSpec, base: Path) -> tuple[Any | None, dict]:
    """(tokenizer or None, info). info has `name` and `source`, or `reason` when none was found.
    An explicit `model.tokenizer` that cannot be loaded is an error (DatasetError)."""
    if model.tokenizer:
        path = _local(model.tokenizer, base)
        try:
            tok = load_local(path, model.trust_remote_code)
        except TokenizerNotFound as exc:
            raise DatasetError(
                "model.tokenizer cannot be loaded",
                [Problem(str(path), None, "model.tokenizer", str(exc))],
                hint="point model.tokenizer at a local folder with tokenizer.json (or a .gguf file), "
                "relative to the job file, or remove it",
            ) from None
        return tok, {"name": model.tokenizer, "source": "model.tokenizer", "path": str(path)}
    path = _local(model.name_or_path, base)
    if path.is_dir():
        try:
            return load_local(path, model.trust_remote_code), {
                "name": model.name_or_path, "source": "model.name_or_path", "path": str(path)
            }
        except TokenizerNotFound as exc:
            return None, {"reason": str(exc)}
    not_found = {
        "reason": f"{model.name_or_path!r} is not a local folder and not in the local Hugging Face cache; "
        "set model.tokenizer to a local tokenizer folder for token statistics (nothing is downloaded)"
    }
    if not _in_hf_cache(model.name_or_path):
        return None, not_found  # answered without importing transformers' auto classes (seconds)
    try:
        from transformers import AutoTokenizer

        with _offline():
            tok = AutoTokenizer.from_pretrained(
                model.name_or_path, revision=model.revision, local_files_only=True,
                trust_remote_code=model.trust_remote_code,
            )
        return tok, {"name": model.name_or_path, "source": "hf-cache"}
    except Exception:
        return None, not_found


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return (Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))).is_dir()


def _local(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p
