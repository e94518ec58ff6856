"""Where things live on the instance, under `instance.remote_root` (the persistent data disk).

    {root}/data/{sha256}/          a prepared dataset, content-addressed (never re-sent)
        train.jsonl eval.jsonl manifest.json [tokens/...]
    {root}/bundles/{sha256}/       the worker code (remote_worker + jobs), content-addressed
    {root}/jobs/{job_id}/          one job
        job.json                   the resolved spec the worker runs
        events.jsonl               the event stream (see jobs.events)
        worker.log                 stdout+stderr of the worker
        state                      running | done | failed | cancelled
        exit_code                  written by the launcher when the worker process ends
        pid                        the worker's process id
        output/adapter/            the final LoRA adapter + manifest.json (sha256 of every file)
        output/checkpoints/step-N/ checkpoints, each complete or absent (written, then renamed):
            manifest.json          sha256 of every file below, adapter/ included
            adapter/               the adapter alone (hard links) + its own manifest.json: what auto-fetch pulls
            optimizer.pt scheduler.pt rng_state.pth trainer_state.json ...   what resuming needs
        .reserve                   ballast the worker frees when the disk fills, to report it and stop cleanly
        transfer.json              the client's measured download speed (the worker sizes its deadline margin by it)
        fetching.<token>           a lease: a client touches it while its fetch runs (the guard waits for it)
        fetched.json               the client's acknowledgement: which adapter it holds, verified (sha256)
        guard/                     the guard process (remote_worker.guard), launched like a job:
            run.sh pid state exit_code worker.log   (client.launcher)
            status.json            what the guard is doing or did: waiting, copied, shut down
    {root}/hf/                     HF_HOME on the data disk

Any laptop can reattach to a job from this layout alone.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.spec import JobSpec

MANIFEST = "manifest.json"
CHECKPOINT_ADAPTER = "adapter"  # step-N/adapter/: the adapter alone, with its own manifest


def layout_for(spec: JobSpec) -> RemoteLayout:
    """The layout of a submitted job: its spec's remote_root was resolved at submit time."""
    assert spec.instance.remote_root, "the remote root is resolved at submit time"
    return RemoteLayout(spec.instance.remote_root)


@dataclass(frozen=True)
class RemoteLayout:
    root: str

    def data_dir(self, digest: str) -> str:
        return posixpath.join(self.root, "data", digest)

    def bundle_dir(self, digest: str) -> str:
        return posixpath.join(self.root, "bundles", digest)

    def hf_home(self) -> str:
        return posixpath.join(self.root, "hf")

    def job(self, job_id: str) -> JobPaths:
        return JobPaths(posixpath.join(self.root, "jobs", job_id))


@dataclass(frozen=True)
class JobPaths:
    dir: str

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.dir, *parts)

    @property
    def spec(self) -> str:
        return self._p("job.json")

    @property
    def events(self) -> str:
        return self._p("events.jsonl")

    @property
    def log(self) -> str:
        return self._p("worker.log")

    @property
    def state(self) -> str:
        return self._p("state")

    @property
    def exit_code(self) -> str:
        return self._p("exit_code")

    @property
    def pid(self) -> str:
        return self._p("pid")

    @property
    def output(self) -> str:
        return self._p("output")

    @property
    def adapter(self) -> str:
        return self._p("output", "adapter")

    @property
    def checkpoints(self) -> str:
        return self._p("output", "checkpoints")

    def checkpoint(self, step: int) -> str:
        return self._p("output", "checkpoints", f"step-{step}")

    @property
    def reserve(self) -> str:
        return self._p(".reserve")

    @property
    def transfer(self) -> str:
        return self._p("transfer.json")

    @property
    def fetching(self) -> str:
        return self._p("fetching")

    @property
    def fetched(self) -> str:
        return self._p("fetched.json")

    @property
    def guard(self) -> JobPaths:
        """The guard's own folder, laid out like a job's (the launcher starts it the same way)."""
        return JobPaths(self._p("guard"))

    @property
    def guard_status(self) -> str:
        return self._p("guard", "status.json")
