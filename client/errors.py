"""Every error autodl-run raises on purpose, under one root.

    AutodlRunError                 base; `.hint` says what to do next
    ├── SpecError                  job.toml is wrong; carries every problem at once (file:line field: message)
    ├── DatasetError               the dataset is missing or has bad records (file:line: reason)
    ├── TransportError             talking to the instance failed
    │   ├── ConnectError           unreachable host (host, port, cause)
    │   ├── AuthError              authentication refused
    │   ├── HostKeyError           the instance's host key changed since it was pinned
    │   ├── RemoteCommandError     a command exited non-zero (command, exit code, last lines of stderr)
    │   ├── CommandTimedOut        a command ran past its timeout (carries its partial output)
    │   └── TransferError          rsync/sftp failed
    ├── RemoteEnvError             the instance lacks something (a Python package, disk space, tmux)
    ├── JobError                   a job is unknown, failed, or in the wrong state
    ├── VerifyError                a fetched file does not match the worker's sha256 manifest
    └── LedgerError                the laptop's job ledger is damaged (`autodl-run ledger repair`)

Only the CLI turns these into exit codes (see client.cli); library code never calls sys.exit.
"""

from __future__ import annotations

from dataclasses import dataclass


class AutodlRunError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f"\n  hint: {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file, located as precisely as we can."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.message}


class _ProblemsError(AutodlRunError):
    def __init__(self, summary: str, problems: list[Problem], hint: str = "", shown: int = 20):
        self.problems = problems
        lines = [summary] + [f"  {p}" for p in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"  ... and {len(problems) - shown} more")
        super().__init__("\n".join(lines), hint)


class SpecError(_ProblemsError):
    exit_code = 2


class DatasetError(_ProblemsError):
    exit_code = 3


class TransportError(AutodlRunError):
    exit_code = 4


class ConnectError(TransportError):
    pass


class AuthError(TransportError):
    pass


class HostKeyError(TransportError):
    pass


class RemoteCommandError(TransportError):
    def __init__(self, command: str, exited: int, stdout: str, stderr: str, where: str = "", hint: str = ""):
        self.command, self.exited, self.stdout, self.stderr = command, exited, stdout, stderr
        tail = "\n".join((stderr or stdout).strip().splitlines()[-10:])
        msg = f"command failed{' on ' + where if where else ''} with exit code {exited}: {command}"
        if tail:
            msg += "\n" + "\n".join("  | " + ln for ln in tail.splitlines())
        super().__init__(msg, hint)


class CommandTimedOut(TransportError):
    """A command ran past its timeout and was stopped; `result` (a client.transport.base.Result with
    exited = -1) holds what it printed until then."""

    def __init__(self, result, timeout: float, where: str = "", hint: str = ""):
        self.result = result
        self.command, self.stdout, self.stderr = result.command, result.stdout, result.stderr
        self.timeout = timeout
        super().__init__(f"command timed out after {timeout:g} s{' on ' + where if where else ''}: {result.command}", hint)


class TransferError(TransportError):
    pass


class RemoteEnvError(AutodlRunError):
    exit_code = 5


class JobError(AutodlRunError):
    exit_code = 6


class VerifyError(AutodlRunError):
    exit_code = 7


class LedgerError(AutodlRunError):
    """The laptop's job ledger (SQLite under $AUTODL_RUN_HOME) is damaged or cannot be written."""

    exit_code = 8
