"""`autodl-run cancel`: stop a job on its instance and on each of its other nodes (instance.hosts).

Every node is reached at once (one thread and one connection each) and stopped as node 0 is
(launcher.cancel: SIGINT to its worker's process group, then SIGTERM, then SIGKILL), so all of a
multi-node job's torchruns get the signal together and their ranks checkpoint in step. A node that
cannot be reached is reported with its error; the others are still cancelled.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from client.errors import AutodlRunError, JobError
from client.ledger import JobRecord
from client.lifecycle.steps import node_spec
from client.remote import launcher
from client.session import open_session
from jobs.protocol import JobState
from jobs.spec import JobSpec


@dataclass
class NodeCancel:
    """What cancel did on one node: its state before and after, or the error that kept it from it."""

    rank: int
    where: str
    before: JobState | None = None
    after: JobState | None = None
    error: AutodlRunError | None = None

    @property
    def cancelled(self) -> bool:
        return self.after is not None

    def describe(self) -> str:
        if self.error is not None:
            return f"node {self.rank} ({self.where}): not reached: {self.error.message}"
        if self.after is None:
            return f"node {self.rank} ({self.where}): already ended ({_state(self.before)}), nothing to cancel"
        if self.after == JobState.CANCELLED:
            return f"node {self.rank} ({self.where}): cancelled"
        return f"node {self.rank} ({self.where}): ended as {self.after.value} before it could be cancelled"

    def as_dict(self) -> dict:
        return {
            "node": self.rank, "where": self.where, "before": self.before.value if self.before else None,
            "after": self.after.value if self.after else None, "error": self.error.message if self.error else None,
        }  # fmt: skip


def _state(state: JobState | None) -> str:
    return state.value if state is not None else "unknown"


def cancel_nodes(record: JobRecord, grace: float = 120.0) -> list[NodeCancel]:
    """Cancel the job on node 0 (its instance) and on each of instance.hosts, all at once.

    Returns one NodeCancel per node, node 0 first. Errors reaching a node are in its NodeCancel,
    never raised (errors that are not the project's own, bugs, are raised)."""
    count = 1 + len(record.spec.instance.hosts)
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda rank: _cancel_one(record, rank, grace), range(count)))


def _cancel_one(record: JobRecord, rank: int, grace: float) -> NodeCancel:
    spec = record.spec if rank == 0 else node_spec(record.spec, rank)
    target: JobRecord | JobSpec = record if rank == 0 else spec
    inst = spec.instance
    result = NodeCancel(rank, f"{inst.host or inst.profile} port {inst.port}")
    try:
        with open_session(target) as session:
            result.where = session.transport.where
            paths = session.layout.job(record.id)
            before = launcher.job_status(session.transport, paths)
            result.before = before.state
            if before.active:
                # SIGINT, then the worker finishes its step and saves a checkpoint
                after = launcher.cancel(session.transport, paths, socket=inst.tmux_socket, session=record.id,
                                        grace=grace)
                result.after = after.state
    except AutodlRunError as exc:
        result.error = exc
    return result


def nothing_to_cancel(record: JobRecord, nodes: list[NodeCancel]) -> JobError | None:
    """The error `cancel` raises when every node it reached had ended already (node 0 reached)."""
    first = nodes[0]
    if first.error is not None or any(n.cancelled for n in nodes):
        return None
    return JobError(
        f"job {record.id} already ended ({_state(first.before)}) on {first.where}: nothing to cancel",
        hint=f"`autodl-run status {record.id}` shows how it ended",
    )
