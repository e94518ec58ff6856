"""A session: one connection to an instance and where the job lives there, made once and passed down.

`open_session(spec or instance)` connects and resolves the placement (`remote_root` with its `~`
against the instance's $HOME): one round trip, which is also what tells an unreachable host early.
`open_session(record)` takes the placement the ledger stored and connects lazily (the first command).
The user's spec is never changed: `session.placed(spec)` is a copy with the resolved root, for what
runs on the instance (job.json, set-up, the submission key).
"""

from __future__ import annotations

from dataclasses import dataclass

from client.ledger import JobRecord
from client.remote.setup import instance_root, python_of
from client.transport import connect
from client.transport.base import Transport
from jobs.layout import Placement, RemoteLayout, layout_for
from jobs.spec import InstanceSpec, JobSpec


@dataclass
class Session:
    transport: Transport
    placement: Placement

    @property
    def layout(self) -> RemoteLayout:
        return layout_for(self.placement)

    @property
    def where(self) -> str:
        return self.transport.where

    def placed(self, spec: JobSpec) -> JobSpec:
        """A copy of `spec` whose remote_root is the resolved one (`spec` itself is left as it is)."""
        instance = spec.instance.model_copy(update={"remote_root": self.placement.remote_root})
        return spec.model_copy(update={"instance": instance})

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_placement(instance: InstanceSpec, transport: Transport) -> Placement:
    """Ask the instance for its $HOME (connecting now: an unreachable host fails here) and resolve the root."""
    home = transport.run(["bash", "-c", 'printf %s "$HOME"']).stdout.strip() or "/"
    root = instance_root(instance)
    if root.startswith("~"):
        root = home + root[1:]
    return Placement(root, home=home, python=python_of(instance))


def open_session(target: JobSpec | InstanceSpec | JobRecord) -> Session:
    if isinstance(target, JobRecord):
        return Session(connect(target.spec.instance), target.placement)
    instance = target.instance if isinstance(target, JobSpec) else target
    transport = connect(instance)
    try:
        return Session(transport, resolve_placement(instance, transport))
    except BaseException:
        transport.close()
        raise
