"""`autodl-run eval JOB`: the base and the tuned model side by side on held-out prompts, with metrics.

On the instance (default): `remote_worker.evaluate` runs there on the GPU (client.remote.posttask),
its result is fetched into `<fetch.to>/<job id>/eval/` and verified against its sha256 manifest, then
acknowledged (the guard waits for that). With `here`: the same module on this laptop, from the
fetched adapter (small models). An `[eval] at_end = true` job has run it already: `fetch_eval` takes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from client.errors import JobError, SpecError, VerifyError
from client.ledger import JobRecord
from client.lifecycle.fetch import Lease, acknowledge, local_copy, pull_verified
from client.remote import posttask
from client.remote.setup import quiet
from client.session import Session, open_session
from jobs.layout import EVAL_JSON, MANIFEST
from jobs.manifest import ManifestError, verify_manifest
from jobs.protocol import EvalResult, ProtocolError, read_model

TASK = "eval"
MODULE = "remote_worker.evaluate"


@dataclass
class Evaluated:
    job_id: str
    folder: Path  # <fetch.to>/<job id>/eval: eval.json, eval.md, manifest.json (verified)
    manifest_sha256: str
    result: EvalResult
    where: str  # "instance" or "here"

    def as_dict(self) -> dict:
        return {"job_id": self.job_id, "folder": str(self.folder), "manifest_sha256": self.manifest_sha256,
                "where": self.where, "result": self.result.model_dump(mode="json")}  # fmt: skip


def _prompts_file(record: JobRecord, prompts: Path | None) -> Path | None:
    if prompts is None and record.spec.eval is not None and record.spec.eval.prompts:
        prompts = Path(record.spec.eval.prompts)
        if not prompts.is_absolute():
            prompts = Path(record.job_file).parent / prompts
    if prompts is not None and not prompts.is_file():
        raise SpecError(f"the prompts file {prompts} does not exist", [])
    return prompts


def _as_jsonl(prompts: Path, out: Path) -> Path:
    """A text file (one prompt a line) becomes jsonl: the instance reads one format."""
    if prompts.suffix in (".jsonl", ".json"):
        return prompts
    lines = [ln.strip() for ln in prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out.write_text("".join(json.dumps({"prompt": ln}, ensure_ascii=False) + "\n" for ln in lines), encoding="utf-8")
    return out


def _options(record: JobRecord, max_new_tokens: int | None, limit: int | None) -> list[str]:
    e = record.spec.eval
    return ["--max-new-tokens", str(max_new_tokens or (e.max_new_tokens if e else 256)),
            "--limit", str(limit or (e.limit if e else 50))]  # fmt: skip


def _read(folder: Path) -> EvalResult:
    try:
        return read_model(EvalResult, (folder / EVAL_JSON).read_bytes(), str(folder / EVAL_JSON))
    except (OSError, ProtocolError) as exc:
        raise VerifyError(f"{folder / EVAL_JSON}: {exc}", hint="run the eval again") from None


def evaluate(record: JobRecord, *, here: bool = False, prompts: Path | None = None, to: Path | None = None,
             base: str | None = None, max_new_tokens: int | None = None, limit: int | None = None,
             log=quiet) -> Evaluated:  # fmt: skip
    prompts = _prompts_file(record, prompts)
    dest = local_copy(record, to).post(TASK)
    opts = _options(record, max_new_tokens, limit) + (["--base", base] if base else [])
    with tempfile.TemporaryDirectory() as tmp:
        if prompts is not None:
            prompts = _as_jsonl(prompts, Path(tmp) / "prompts.jsonl")
        if here:
            return _here(record, dest, prompts, opts, to, log)
        with open_session(record) as session:
            return _on_instance(session, record, dest, prompts, opts, log)


def _here(record: JobRecord, dest: Path, prompts: Path | None, opts: list[str], to: Path | None, log) -> Evaluated:
    from client.home import prepared_dir

    adapter = local_adapter(record, to)
    args = ["--adapter", str(adapter), "--out", str(dest), *opts]
    if prompts is not None:
        args += ["--prompts", str(prompts)]
    else:
        args += ["--data", str(prepared_dir() / record.data_digest)]
    log(f"evaluating on this machine: {adapter}")
    run_here(MODULE, args)
    try:
        digest = verify_manifest(dest)
    except ManifestError as exc:
        raise VerifyError(f"{dest}: {exc}", hint="run the eval again") from None
    return Evaluated(record.id, dest, digest, _read(dest), "here")


def _on_instance(session: Session, record: JobRecord, dest: Path, prompts: Path | None, opts: list[str], log) -> Evaluated:
    transport, job = session.transport, session.layout.job(record.id)
    require_remote_adapter(transport, job, record)
    task = job.post(TASK)
    args = ["--adapter", job.adapter, "--out", task.post_result, *opts]
    if prompts is not None:
        transport.run(["mkdir", "-p", "--", task.dir])
        transport.put(prompts, task.post_prompts)
        args += ["--prompts", task.post_prompts]
    else:
        args += ["--data", session.layout.data_dir(record.data_digest)]
    posttask.ensure_deps(transport, session.placed(record.spec), log)
    env = posttask.bundle_env(session, record.spec)
    posttask.run_task(session, session.placed(record.spec), record.id, TASK, MODULE, args, env=env, log=log)
    return fetch_eval(record, session=session, dest=dest)


def fetch_eval(record: JobRecord, *, session: Session, dest: Path | None = None, wait_s: float = 0.0) -> Evaluated:
    """Pull post/eval/result (verified) and acknowledge it. `wait_s`: wait that long for it to appear
    while the worker still runs (an `[eval] at_end` job evaluates after its `done` event)."""
    from client.remote import launcher

    transport, job = session.transport, session.layout.job(record.id)
    task = job.post(TASK)
    dest = dest or local_copy(record).post(TASK)
    deadline = time.monotonic() + wait_s
    while not posttask.has_result(transport, task):
        if time.monotonic() > deadline or not launcher.job_status(transport, job).active:
            if posttask.has_result(transport, task):
                break
            raise JobError(f"job {record.id} has no eval result on {transport.where}",
                           hint=f"run it: autodl-run eval {record.id}")  # fmt: skip
        time.sleep(posttask.POLL_S)
    with Lease(transport, job):
        digest, _ = pull_verified(transport, task.post_result, dest)
        acknowledge(transport, task, manifest_sha256=digest, what="eval")
    return Evaluated(record.id, dest, digest, _read(dest), "instance")


def require_remote_adapter(transport, job, record: JobRecord) -> None:
    if not transport.run(["test", "-f", job.adapter + "/" + MANIFEST], check=False).ok:
        raise JobError(f"job {record.id} has no final adapter on {transport.where}",
                       hint=f"wait for it to finish (`autodl-run tail {record.id}`), or use --here with a fetched adapter")  # fmt: skip


def local_adapter(record: JobRecord, to: Path | None = None) -> Path:
    """The fetched final adapter on this laptop, verified again before it is used."""
    adapter = Path(record.fetched_to) if record.fetched_to else local_copy(record, to).adapter
    if not (adapter / MANIFEST).is_file():
        raise JobError(f"no fetched adapter for job {record.id} at {adapter}",
                       hint=f"fetch it first: autodl-run fetch {record.id}")  # fmt: skip
    try:
        verify_manifest(adapter)
    except ManifestError as exc:
        raise VerifyError(f"{adapter}: {exc}", hint=f"fetch it again: autodl-run fetch {record.id}") from None
    return adapter


def run_here(module: str, args: list[str]) -> None:
    """A worker module on this laptop, its output shown as it comes; a failure raises JobError."""
    res = subprocess.run([sys.executable, "-m", module, *args], env=posttask.here_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-12:])
        raise JobError(f"python -m {module} failed on this machine (exit {res.returncode}):\n{tail}",
                       hint="see the message above; on the instance it runs with its GPU: drop --here")  # fmt: skip
