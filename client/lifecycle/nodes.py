"""The other nodes of a multi-node job (instance.hosts) as `status` shows them when node 0 does not
answer: each node's state and its last failure, read from its own job folder (a node that stopped
because node 0 vanished says so there: NodeLost, remote_worker.nodewatch)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from client.errors import AutodlRunError
from client.ledger import JobRecord
from client.lifecycle.steps import node_spec
from client.remote.follow import poll_once
from client.session import open_session
from jobs import events as ev
from jobs.layout import JOB_FILES


def describe_others(record: JobRecord) -> list[str]:
    """One line per node 1, 2, ...: `node 1 (WHERE): STATE[: ErrorClass: message]`, or why it was not reached.
    The lines quote the instance: the CLI escapes them as it does every error."""
    count = len(record.spec.instance.hosts)
    if not count:
        return []
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda rank: _describe(record, rank), range(1, count + 1)))


def _describe(record: JobRecord, rank: int) -> str:
    spec = node_spec(record.spec, rank)
    try:
        with open_session(spec) as session:
            poll, _ = poll_once(session.transport, session.layout.job(record.id), JOB_FILES["events"], 0)
            failures = [e for e in map(ev.parse_or_none, poll.lines) if isinstance(e, ev.Failed)]
            said = f": {failures[-1].error_class}: {failures[-1].message}" if failures else ""
            return f"node {rank} ({session.where}): {poll.state.state.value}{said}"
    except AutodlRunError as exc:
        return f"node {rank} ({spec.instance.describe()}): not reached: {exc.message}"
