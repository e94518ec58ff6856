"""Write job.toml files and datasets for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "client.cli"]


def cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `autodl-run ARGS` as a user would, in a subprocess; with check, a non-zero exit fails the test."""
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if check and res.returncode != 0:
        raise AssertionError(f"autodl-run {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def cli_here(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`autodl-run ARGS` through the CLI's own main() in this process: its exit code, stdout and stderr, as
    cli() gives them. A new interpreter imports torch and transformers again only to load the tokenizer
    (~10 s of CPU on the 2-core test machine), where this process has them already. For a verb that launches
    nothing (check, prepare, a refused submit) and for a submit that only sets a test's scenario up (the
    worker is the tmux server's, not this process's child); what a test is about stays cli(), a process as
    a user runs it. `timeout`: SIGALRM ends a verb that hangs (main thread only)."""
    import contextlib
    import io
    import signal

    from client import cli as entry

    if args and args[0] in ("ssh", "chat", "login"):  # exec, or a terminal of its own: only as a process
        raise ValueError(f"`autodl-run {args[0]}` cannot run in this process: use cli()")

    def expired(signum, frame):
        raise TimeoutError(f"autodl-run {' '.join(args)} still ran after {timeout:g} s")

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    before = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    sys.argv = ["autodl-run", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry.main()
        code = 0  # main() always exits
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        sys.argv = argv
    res = subprocess.CompletedProcess(["autodl-run", *args], code, out.getvalue(), err.getvalue())
    if check and res.returncode != 0:
        raise AssertionError(f"autodl-run {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def ssh_instance(sshd, root: Path, tmux_socket: str, **extra) -> dict:
    """[instance] fields reaching the test sshd, state under `root`. The guard never shuts this machine down."""
    return {
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "identity_file": str(sshd.identity_file),
        "connect_timeout": 30.0,
        "remote_root": str(root),
        "tmux_socket": tmux_socket,
        "python": sys.executable,
        "shutdown_after": "never",
        **extra,
    }


PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Translate to Chinese: hello.", "你好。"),
    ("Write a haiku about GPUs.", "The quick brown fox jumps over the lazy dog."),
    ("question", "answer 0123456789"),
]


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


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


def run_in_process(job):
    """Run the worker's recipe for a WorkerJob in this process; events go to job_dir/events.jsonl."""
    from jobs import events as ev
    from remote_worker import recipe

    Path(job.job_dir).mkdir(parents=True, exist_ok=True)
    writer = ev.EventWriter(Path(job.job_dir) / "events.jsonl")
    try:
        return recipe.run(job, writer)
    finally:
        writer.close()
