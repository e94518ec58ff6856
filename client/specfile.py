"""Load `job.toml` into a `JobSpec`, reporting every problem at once with file, line and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import tomllib
from pydantic import ValidationError

from client.errors import Problem, SpecError
from jobs.spec import JobSpec

_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(
            f"job file not found: {path}",
            [],
            hint="give the path of a job.toml; `autodl-run init` writes an example to start from",
        )
    text = path.read_text(encoding="utf-8-sig")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(exc)
        raise SpecError(
            f"{path} is not valid TOML",
            [Problem(str(path), line, "", str(exc).split(" (at line")[0])],
            hint="fix the TOML syntax at that line (strings need quotes, tables are [name])",
        ) from None
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        index = _line_index(text)
        problems: list[Problem] = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            loc = tuple(p for p in loc if p not in _UNION_TAGS)
            field = ".".join(loc)
            problem = Problem(str(path), _find_line(index, loc), field, _message(err))
            if problems and (problems[-1].field, problems[-1].line) == (field, problem.line):
                # A union's alternatives fail one by one: say them as one problem.
                problem = Problem(str(path), problem.line, field, f"{problems.pop().message}, or {problem.message}")
            problems.append(problem)
        noun = "problem" if len(problems) == 1 else "problems"
        raise SpecError(
            f"{path}: {len(problems)} {noun} in the job spec",
            problems,
            hint="fix the fields above; `autodl-run check` re-validates without touching any instance",
        ) from None
    if spec.instance.is_local:
        _resolve_local_model(spec, path, _line_index(text))
    return spec


def _resolve_local_model(spec: JobSpec, path: Path, index: dict[tuple[str, ...], int]) -> None:
    """On the local target a relative model path means the job file's folder, not the worker's: made absolute.

    A path-looking name (`./base`, `../m`, `~/m`) that is not there is refused now, not after launch."""
    name = spec.model.name_or_path
    looks_like_path = name.startswith(("./", "../", "~", ".\\")) or name in (".", "..")
    if Path(name).is_absolute() or not looks_like_path and not (path.parent / name).exists():
        return
    where = Path(name).expanduser()
    where = where if where.is_absolute() else (path.parent / where)
    if not where.exists():
        line = index.get(("model", "name_or_path"))
        raise SpecError(
            f"{path}: model.name_or_path {name!r} is a path, and there is no {where.resolve()}",
            [Problem(str(path), line, "model.name_or_path", f"no such folder: {where.resolve()}")],
            hint="a relative path is read from the job file's folder; give the model's folder, or a hub id",
        )
    spec.model.name_or_path = str(where.resolve())


_UNION_TAGS = {"str", "list[str]", "literal['all-linear']", "int", "float", "bool"}


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (typo? see the example job files for valid keys)"
    if err["type"] == "missing":
        return "required, but missing"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def _toml_error_line(exc: tomllib.TOMLDecodeError) -> int | None:
    m = re.search(r"line (\d+)", str(exc))
    return int(m.group(1)) if m else None


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each (table..., key) path to the line where it is written; tables to their header line."""
    index: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for n, line in enumerate(text.splitlines(), start=1):
        if m := _TABLE.match(line):
            table = tuple(m.group(1).split("."))
            index.setdefault(table, n)
        elif m := _KEY.match(line):
            index.setdefault(table + (m.group(1),), n)
    return index


def _find_line(index: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> int | None:
    # The deepest written prefix of the location: `lora.r` -> its line; a missing key -> its table.
    for end in range(len(loc), 0, -1):
        if loc[:end] in index:
            return index[loc[:end]]
    return None
