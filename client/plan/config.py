"""A model's config.json, without its weights: a local file or folder, the laptop's cache, or one small
HTTP GET from the hub (`instance.hf_endpoint`, else `HF_ENDPOINT`, else huggingface.co), its mirror
(hf-mirror.com) and ModelScope, each with a timeout. A fetched config is cached under
`$AUTODL_RUN_HOME/configs/`, so the next plan of the same model is offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from client.errors import AutodlRunError
from jobs import autodl
from jobs.memory import Arch

TIMEOUT_S = 8.0
MAX_BYTES = 1 << 20  # a config.json is a few kB; anything larger is not one
HUB = "https://huggingface.co"
MODELSCOPE = "https://modelscope.cn"


class ConfigError(AutodlRunError):
    exit_code = 2


def hub_urls(repo: str, revision: str | None, hf_endpoint: str | None) -> list[str]:
    rev = revision or "main"
    rev_ms = revision or "master"
    ends = [hf_endpoint, os.environ.get("HF_ENDPOINT"), HUB, autodl.HF_MIRROR]
    seen: list[str] = []
    for e in ends:
        if e and e.rstrip("/") not in seen:
            seen.append(e.rstrip("/"))
    urls = [f"{e}/{repo}/resolve/{rev}/config.json" for e in seen]
    urls.append(f"{MODELSCOPE}/api/v1/models/{repo}/repo?Revision={rev_ms}&FilePath=config.json")
    return urls


def _get(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http(s) URLs we built)
        body = r.read(MAX_BYTES + 1)
    if len(body) > MAX_BYTES:
        raise ValueError("over 1 MiB: not a config.json")
    cfg = json.loads(body)
    if not isinstance(cfg, dict):
        raise ValueError("not a JSON object")
    return cfg


def _cache_file(cache: Path, repo: str, revision: str | None) -> Path:
    key = hashlib.sha256(f"{repo}@{revision or ''}".encode()).hexdigest()[:16]
    return cache / f"{repo.replace('/', '--')}-{key}.json"


def fetch(repo: str, revision: str | None, urls: Sequence[str], cache: Path | None, timeout: float = TIMEOUT_S) -> dict:
    """The config of hub id `repo`: the cached copy, else the first of `urls` that answers."""
    cached = _cache_file(cache, repo, revision) if cache else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())
    tried = []
    for url in urls:
        try:
            cfg = _get(url, timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            tried.append(f"{url}: {getattr(exc, 'reason', exc)}")
            continue
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(cfg))
        return cfg
    raise ConfigError(
        f"cannot fetch the config.json of {repo}: " + "; ".join(tried),
        hint="pass --config PATH (a config.json or the model's folder on this laptop), or set instance.hf_endpoint",
    )


def read_local(path: Path) -> dict:
    f = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {f}: {exc}", hint="give a model folder with a config.json") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{f} is not a JSON object", hint="give a model's config.json")
    return cfg


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".json")


def load(name_or_path: str, *, revision: str | None = None, hf_endpoint: str | None = None,
         cache: Path | None = None, base: Path | None = None, timeout: float = TIMEOUT_S) -> tuple[dict, str]:
    """(config, where it came from) for `model.name_or_path` or `--config`."""
    local = Path(os.path.expanduser(name_or_path))
    if base is not None and not local.is_absolute():
        local = base / local
    if local.exists():
        return read_local(local), str(local)
    if looks_like_path(name_or_path):
        raise ConfigError(
            f"{name_or_path} is a path on the instance, not on this laptop: its config.json is not here",
            hint="pass --config PATH to a copy of the model's config.json",
        )
    cfg = fetch(name_or_path, revision, hub_urls(name_or_path, revision, hf_endpoint), cache, timeout)
    return cfg, f"{name_or_path} (hub)"


def arch(cfg: dict, where: str) -> Arch:
    try:
        return Arch.from_config(cfg)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}", hint="a decoder-only model's config.json is needed") from exc
