"""Auto-fetch: while `tail` (or `submit --follow`) runs, each new checkpoint's adapter comes to the laptop.

`tail` hands every `checkpoint` event to `offer`; a background thread, on a connection of its own,
pulls that checkpoint's `adapter/` (not the optimizer state) into
`<fetch.to>/<job id>/checkpoints/step-N/adapter`, verifies it against the sha256 the event names,
and keeps only the newest (client.lifecycle.fetch.prune_local). The local folder is named from the step alone
(jobs.layout.checkpoint_name), never from a path the instance sends; the copy is checked like
every fetch (client.lifecycle.fetch.pull_verified). Offers arriving while a fetch runs collapse
into the newest one, so the laptop always ends up holding the latest checkpoint, never a queue of
stale ones. Each fetch reports its speed to the instance (the worker's deadline margin uses it), and
brings the job's record up to date (client.record: only the new bytes of the events, log and
TensorBoard files), so the laptop keeps the run's history even if the instance vanishes mid-run.

A failed fetch is tried again (ATTEMPTS in all, RETRY_S apart) unless a newer checkpoint has come
meanwhile; `close()` waits for the newest before `tail` fetches the final adapter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from client.errors import AutodlRunError, CommandTimedOut, ConnectError
from client.ledger import JobRecord
from client.lifecycle.fetch import FetchedCheckpoint, fetch_checkpoint, local_copy, pull_record, report_speed
from client.session import Session, open_session
from jobs import events as ev
from jobs.layout import MANIFEST
from jobs.manifest import sha256_file

ATTEMPTS = 3
RETRY_S = 3.0


class AutoFetcher:
    def __init__(self, record: JobRecord, log: Callable[[str], None], to: Path | None = None):
        self.record, self.log, self.to = record, log, to
        self.latest: FetchedCheckpoint | None = None
        self._want: ev.Checkpoint | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._abandon = False  # close(wait=False): drop what is pending, retries too
        self._attempts: dict[int, int] = {}
        self._session: Session | None = None  # its own connection: the follower keeps the other
        self._thread = threading.Thread(target=self._run, name="auto-fetch", daemon=True)
        self._thread.start()

    def offer(self, event: ev.Checkpoint) -> None:
        """A new checkpoint exists on the instance: fetch its adapter (superseding an older pending one)."""
        if not event.adapter_path or not event.adapter_manifest_sha256 or event.step < 0:
            return  # a worker from before checkpoints had an adapter folder (or a nonsense step)
        with self._cond:
            if self._want is None or event.step >= self._want.step:
                self._want = event
                self._cond.notify_all()

    def close(self, wait: bool = True, timeout: float = 900.0) -> FetchedCheckpoint | None:
        """Stop; with `wait`, after the pending checkpoint (the newest) is fetched. Returns the newest held."""
        with self._cond:
            self._closing = True
            if not wait:
                self._want, self._abandon = None, True
            self._cond.notify_all()
        self._thread.join(timeout if wait else 5.0)
        if self._session is not None:
            self._session.close()
            self._session = None
        return self.latest

    # -- the background thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._want is None and not self._closing:
                    self._cond.wait()
                if self._want is None:
                    return
                event, self._want = self._want, None
            try:
                self._fetch(event)
            except Exception as exc:  # never let the view die of a background fetch
                message = exc.message if isinstance(exc, AutodlRunError) else repr(exc)
                # a dead or wedged link is opened anew; a checkpoint rotated away (the common case) or a
                # refused file leaves a healthy connection as it is
                if isinstance(exc, ConnectError | CommandTimedOut) and self._session is not None:
                    self._session.close()
                    self._session = None
                attempt = self._attempts[event.step] = self._attempts.get(event.step, 0) + 1
                with self._cond:
                    if self._want is not None:
                        continue  # superseded by a newer one (this one was rotated away, most likely)
                    if attempt < ATTEMPTS:
                        self._cond.wait(RETRY_S)  # a newer checkpoint or close() wakes it early
                        if self._want is None and not self._abandon:
                            self._want = event
                        continue
                self.log(f"could not fetch checkpoint step-{event.step} ({message.splitlines()[0]})")

    def _fetch(self, event: ev.Checkpoint) -> None:
        copy = local_copy(self.record, self.to)
        manifest = copy.checkpoint_adapter(event.step) / MANIFEST
        if manifest.is_file() and sha256_file(manifest) == event.adapter_manifest_sha256:
            self.latest = FetchedCheckpoint(
                event.step, copy.checkpoint(event.step), event.adapter_manifest_sha256, False, 0, 0.0
            )
            return  # already here, verified before (a second `tail` of the same job)
        if self._session is None:
            self._session = open_session(self.record)
        got = fetch_checkpoint(
            self.record,
            to=self.to,
            full=False,
            step=event.step,
            expected_sha256=event.adapter_manifest_sha256,
            session=self._session,
        )
        report_speed(self._session.transport, self._session.layout.job(self.record.id), got.bytes, got.seconds)
        pull_record(self.record, self._session, self.to, log=self.log)
        self.latest = got
        self.log(f"checkpoint step-{got.step}: adapter fetched and verified -> {got.adapter}")
