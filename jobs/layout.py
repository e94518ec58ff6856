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
        output/checkpoints/step-N/ checkpoints, each complete or absent (written, then renamed)
    {root}/hf/                     HF_HOME on the data disk

Any laptop can reattach to a job from this layout alone.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

MANIFEST = "manifest.json"


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
