"""`fetch`: pull the final adapter back and verify it against the worker's sha256 manifest.

The copy lands in `<dest>.partial` and is renamed into place only once every file matches,
so a fetched adapter folder is always a verified one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from client.errors import JobError, VerifyError
from client.ledger import JobRecord, Ledger
from client.submit import layout_for
from client.transport import connect
from jobs.manifest import ManifestError, verify_manifest

LOAD_SNIPPET = """from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{adapter}")"""


def default_destination(record: JobRecord) -> Path:
    to = Path(record.spec.fetch.to).expanduser()
    if not to.is_absolute():
        to = Path(record.job_file).parent / to
    return to / record.id / "adapter"


def fetch(record: JobRecord, ledger: Ledger, to: Path | None = None) -> tuple[Path, str]:
    """Returns (the verified adapter folder, the manifest's sha256)."""
    if record.state in ("failed", "cancelled", "lost"):
        raise JobError(
            f"job {record.id} ended as {record.state}: it has no final adapter",
            hint=f"see why with `autodl-run tail {record.id} --raw`",
        )
    dest = Path(to) / record.id / "adapter" if to else default_destination(record)
    paths = layout_for(record.spec).job(record.id)
    transport = connect(record.spec.instance)
    try:
        if not transport.run(["test", "-f", paths.adapter + "/manifest.json"], check=False).ok:
            raise JobError(
                f"job {record.id} has no final adapter yet on {transport.where}",
                hint=f"wait for it to finish (`autodl-run tail {record.id}`), then fetch again",
            )
        partial = dest.with_name(dest.name + ".partial")
        transport.get(paths.adapter, partial)
    finally:
        transport.close()
    try:
        digest = verify_manifest(partial)
    except ManifestError as exc:
        raise VerifyError(
            f"the fetched adapter in {partial} does not match the worker's manifest: {exc}",
            hint=f"fetch again (`autodl-run fetch {record.id}`): only differing files are re-sent",
        ) from None
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)
    ledger.update(record.id, fetched_to=str(dest))
    return dest, digest
