"""Write job.toml files and datasets for tests."""

from __future__ import annotations

import json
from pathlib import Path


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_toml(path: Path, top: dict, sections: dict[str, dict]) -> Path:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, fields in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Translate to Chinese: hello.", "你好。"),
    ("Who keeps the Yak Lighthouse?", "Captain Mira Okonkwo keeps it."),
    ("Write a haiku about GPUs.", "Rented by the hour, the fans hum."),
]


def write_alpaca(path: Path, n: int = 16) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q, a = QA[i % len(QA)]
            f.write(json.dumps({"instruction": f"{q} ({i})", "input": "", "output": a}, ensure_ascii=False) + "\n")
    return path


def write_job(
    folder: Path,
    *,
    model: Path | str,
    instance: dict,
    name: str = "t-job",
    train: dict | None = None,
    data: dict | None = None,
    rows: int = 16,
    bits: int = 16,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_alpaca(folder / "train.jsonl", rows)
    return write_toml(
        folder / "job.toml",
        {"name": name},
        {
            "instance": instance,
            "model": {"name_or_path": str(model)},
            "data": {"train": "train.jsonl", "max_length": 128, **(data or {})},
            "lora": {"r": 8, "alpha": 16},
            "quant": {"bits": bits},
            "train": {"max_steps": 6, "learning_rate": 1e-2, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                      "device": "cpu", **(train or {})},
            "fetch": {"to": "runs"},
        },
    )
