"""`autodl-run export JOB --merged | --gguf [TYPE] | --ollama [TYPE]`: the adapter merged, as files to ship.

Runs `remote_worker.export` on the instance (default; the base is there already) or on this laptop
(`here`, from the fetched adapter), then the result is fetched into `<fetch.to>/<job id>/export/<task>/`,
verified against its sha256 manifest and acknowledged, like the adapter. Its `export.json`
(jobs.protocol.ExportRecord) says what was merged onto what and how the merge and the GGUF file were checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.errors import SpecError, VerifyError
from client.ledger import JobRecord
from client.lifecycle.evaluate import local_adapter, require_remote_adapter, run_here
from client.lifecycle.fetch import Lease, acknowledge, local_copy, pull_verified
from client.remote import posttask
from client.remote.setup import quiet
from client.session import open_session
from jobs.layout import EXPORT_JSON
from jobs.manifest import ManifestError, verify_manifest
from jobs.protocol import ExportRecord, ProtocolError, read_model

MODULE = "remote_worker.export"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_0")  # remote_worker.export.GGUF_TYPES (no torch here)


@dataclass
class Exported:
    job_id: str
    task: str
    folder: Path
    manifest_sha256: str
    record: ExportRecord
    where: str

    def as_dict(self) -> dict:
        return {"job_id": self.job_id, "task": self.task, "folder": str(self.folder),
                "manifest_sha256": self.manifest_sha256, "where": self.where,
                "export": self.record.model_dump(mode="json")}  # fmt: skip


def kquant_hint(qtype: str) -> str:
    """What to do for a K-quant (q4_k_m, q6_k, ...) or i-quant: the gguf library can read them but not make them."""
    import re

    if not re.fullmatch(r"i?q\d_(k(_[sml])?|[a-z]+)", qtype.lower()):
        return ""
    return (f"{qtype} is a K-quant or i-quant: the gguf library (0.19) only decodes those, it has no quantizer. "
            f"Export --gguf f16, then run llama.cpp: llama-quantize model-f16.gguf model-{qtype.upper()}.gguf "
            f"{qtype.upper()} (docs/export.md)")  # fmt: skip


def task_of(kind: str, qtype: str = "") -> tuple[str, list[str]]:
    """(task folder name, the module's arguments) for `--merged`, `--gguf TYPE`, `--ollama TYPE`."""
    if kind == "merged":
        return "export-merged", ["--merged"]
    if qtype not in GGUF_TYPES:
        raise SpecError(f"unknown GGUF type {qtype!r}: one of {', '.join(GGUF_TYPES)}", [], hint=kquant_hint(qtype))
    return f"export-{kind}-{qtype}", [f"--{kind}", qtype]


def export(record: JobRecord, kind: str, qtype: str = "q8_0", *, here: bool = False, to: Path | None = None,
           base: str | None = None, log=quiet) -> Exported:  # fmt: skip
    task, what = task_of(kind, qtype)
    dest = local_copy(record, to).post(task)
    extra = ["--base", base] if base else []
    if here:
        adapter = local_adapter(record, to)
        log(f"exporting on this machine: {adapter}")
        run_here(MODULE, ["--adapter", str(adapter), "--out", str(dest), *what, *extra])
        try:
            digest = verify_manifest(dest)
        except ManifestError as exc:
            raise VerifyError(f"{dest}: {exc}", hint="export again") from None
        return Exported(record.id, task, dest, digest, _read(dest), "here")
    with open_session(record) as session:
        transport, job = session.transport, session.layout.job(record.id)
        require_remote_adapter(transport, job, record)
        placed = session.placed(record.spec)
        posttask.ensure_deps(transport, placed, log)
        env = posttask.bundle_env(session, record.spec)
        out = job.post(task)
        args = ["--adapter", job.adapter, "--out", out.post_result, *what, *extra]
        posttask.run_task(session, placed, record.id, task, MODULE, args, env=env, log=log)
        log(f"fetching {task} from {transport.where}")
        with Lease(transport, job):
            digest, _ = pull_verified(transport, out.post_result, dest)
            acknowledge(transport, out, manifest_sha256=digest, what="export")
    return Exported(record.id, task, dest, digest, _read(dest), "instance")


def _read(folder: Path) -> ExportRecord:
    try:
        return read_model(ExportRecord, (folder / EXPORT_JSON).read_bytes(), str(folder / EXPORT_JSON))
    except (OSError, ProtocolError) as exc:
        raise VerifyError(f"{folder / EXPORT_JSON}: {exc}", hint="export again") from None
