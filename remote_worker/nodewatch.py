"""On nodes 1, 2, ... of a multi-node job: stop when node 0 vanishes, instead of waiting forever.

Node 0's torchrun holds the rendezvous store (the static rendezvous' TCPStore at --master-addr and
--master-port) for as long as it runs. A node 0 whose host goes down or off the network closes no
connection, so the ranks here would wait in their next collective until gloo's timeout (30 minutes) or
NCCL's. This thread, in the node's torchrun (remote_worker.torchrun), connects to that port every
INTERVAL_S; when none succeeded for `instance.node_timeout_s`, it writes one `failed` event (NodeLost)
in this node's job folder and ends its torchrun at once: the ranks die with it (PR_SET_PDEATHSIG,
remote_worker.distributed) and the wrapper records `failed`.

A frozen node 0 whose kernel still answers TCP is not seen here (the collectives' timeout remains).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from jobs.events import EventWriter, Failed
from jobs.layout import JobPaths
from jobs.protocol import ProtocolError, read_model
from jobs.spec import InstanceSpec, WorkerJob

INTERVAL_S = 5.0
CONNECT_TIMEOUT_S = 5.0
EXIT_CODE = 1  # the wrapper turns it into `failed`


def reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def watch(host: str, port: int, timeout_s: float, on_lost: Callable[[float], None], *,
          interval: float = INTERVAL_S, probe: Callable[[str, int], bool] = reachable) -> None:  # fmt: skip
    """Probe host:port every `interval` s; call on_lost(seconds unanswered) once none answered for timeout_s
    (counted from the start: a node 0 that never comes up is lost too), then return."""
    last = time.monotonic()
    while True:
        if probe(host, port):
            last = time.monotonic()
        elif time.monotonic() - last >= timeout_s:
            on_lost(time.monotonic() - last)
            return
        time.sleep(interval)


def lost_event(job_id: str, node: int, host: str, port: int, silent_s: float, timeout_s: float) -> Failed:
    return Failed(
        error_class="NodeLost",
        message=(f"node 0's rendezvous at {host}:{port} has not answered for {silent_s:.0f} s "
                 f"(instance.node_timeout_s = {timeout_s:g}): its host is down or unreachable, or its torchrun "
                 f"ended; node {node} stopped its ranks rather than wait for it in a collective"),
        hint=(f"check node 0 (`autodl-run status {job_id}`); once every node answers, continue from the last "
              f"checkpoint with `autodl-run resume {job_id}`, or stop what is left with `autodl-run cancel {job_id}`"),
    )  # fmt: skip


def start(node: int, nnodes: int, host: str, port: int, job_json: str) -> threading.Thread | None:
    """On a node other than 0 of several, watch node 0 in a daemon thread; None elsewhere."""
    if node == 0 or nnodes <= 1:
        return None
    try:
        job: WorkerJob | None = read_model(WorkerJob, Path(job_json).read_bytes(), job_json)
    except (OSError, ProtocolError) as exc:
        print(f"cannot read {job_json} for instance.node_timeout_s: {exc}", file=sys.stderr, flush=True)
        job = None
    timeout_s = job.spec.instance.node_timeout_s if job else InstanceSpec().node_timeout_s

    def lost(silent_s: float) -> None:
        event = lost_event(job.job_id if job else "JOB", node, host, port, silent_s, timeout_s)
        if job is not None:
            try:
                writer = EventWriter(JobPaths(job.job_dir).events)
                writer.emit(event)
                writer.close()
            except OSError as exc:
                print(f"cannot write the failure: {exc}", file=sys.stderr)
        print(f"failed: {event.message}\nhint: {event.hint}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)  # the agent may sit in a rendezvous or a monitor loop: no clean way out of either

    thread = threading.Thread(target=watch, args=(host, port, timeout_s, lost), name="node0-watch", daemon=True)
    thread.start()
    return thread
