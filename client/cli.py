"""The `autodl-run` command line. The only place errors become exit codes.

Exit codes: 0 ok · 1 unexpected error · 2 bad job spec · 3 bad dataset · 4 cannot reach or talk to
the instance · 5 the instance lacks something · 6 the job failed / is unknown / in the wrong state ·
7 a fetched file failed verification · 130 interrupted.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client import __version__
from client.errors import AutodlRunError
from client.ledger import Ledger

EXIT_CODES = """Exit codes: 0 ok, 1 unexpected error, 2 bad job spec, 3 bad dataset, 4 cannot reach or talk
to the instance, 5 the instance lacks something, 6 the job failed or is unknown, 7 a fetched file failed
verification, 130 interrupted."""

app = typer.Typer(
    name="autodl-run",
    help="Fine-tune an LLM with QLoRA on a rented GPU (AutoDL or any SSH box), from your laptop.\n\n"
    "Typical use: `autodl-run check job.toml`, `autodl-run submit job.toml --follow`, "
    "`autodl-run fetch`.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

JobFile = Annotated[Path, typer.Argument(help="the job spec, e.g. job.toml", show_default=False)]
JobId = Annotated[str | None, typer.Argument(help="job id or a unique prefix; default: the latest job")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _log(msg: str) -> None:
    err_console.print(msg)


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        console.print(f"autodl-run {__version__}")
        raise typer.Exit()


@app.command()
def check(job_file: JobFile, as_json: JsonOpt = False) -> None:
    """Validate the job spec and the dataset, without any network. Reports every error at once."""
    from client import dataset
    from client.specfile import load_spec

    spec = load_spec(job_file)
    report = dataset.check(spec, job_file.resolve())
    if as_json:
        _print_json({"ok": True, "name": spec.name, "instance": spec.instance.describe(), "dataset": report})
        return
    console.print(f"[green]✓[/] {escape(str(job_file))}: job `{spec.name}` on {spec.instance.describe()}")
    console.print(
        f"[green]✓[/] dataset: {report['records_out']:,} records ok"
        + (f", {len(report['invalid'])} skipped as invalid" if report.get("invalid") else "")
    )


@app.command()
def prepare(
    job_file: JobFile,
    show: Annotated[int, typer.Option(help="print N examples as the model sees them, trained tokens highlighted")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Prepare the dataset locally: canonical jsonl, checked, with token statistics (no GPU is paid for)."""
    from client import dataset
    from client.ledger import home
    from client.specfile import load_spec

    spec = load_spec(job_file)
    prepared = dataset.prepare(spec, job_file.resolve(), home() / "prepared")
    if as_json:
        _print_json(prepared.report)
        return
    dataset.render_report(prepared.report, console)
    if show:
        dataset.render_examples(prepared, None, show, console)


@app.command()
def submit(
    job_file: JobFile,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="then follow it like `tail`, exit with its outcome")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check, prepare, upload and launch a job on its instance (under tmux); print the job id."""
    from client.submit import submit as do_submit

    ledger = Ledger()
    result = do_submit(job_file, ledger=ledger, log=_log)
    if as_json:
        _print_json(result.as_dict())
    else:
        console.print(f"[bold]{result.job_id}[/]")
        _log(f"follow it with: autodl-run tail {result.job_id}")
    if follow:
        _tail(ledger, result.job_id, raw=False, as_json=False)


def _tail(ledger: Ledger, job: str | None, raw: bool, as_json: bool) -> None:
    from client.tail import tail as do_tail

    record = ledger.get(job)
    progress = do_tail(record, ledger, console, raw=raw, as_json=as_json)
    if not as_json and not raw and progress.done:
        _log(f"[green]✓[/] {record.id} done. Fetch the adapter with: autodl-run fetch {record.id}")


@app.command()
def tail(
    job: JobId = None,
    raw: Annotated[bool, typer.Option("--raw", help="stream the worker's log instead of the progress view")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the events as JSON lines")] = False,
) -> None:
    """Follow a job live: step, loss, lr, tokens/s, ETA, memory, spend. Reconnects by itself."""
    _tail(Ledger(), job, raw, as_json)


@app.command()
def status(job: JobId = None, as_json: JsonOpt = False) -> None:
    """Show where a job stands (asks the instance once)."""
    from client.render import fmt_duration
    from client.tail import status as do_status

    ledger = Ledger()
    info = do_status(ledger.get(job), ledger)
    if as_json:
        _print_json(info)
        return
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("job", info["id"])
    t.add_row("instance", info["instance"])
    t.add_row("state", info["state"])
    t.add_row("phase", info["phase"])
    if info["total_steps"]:
        t.add_row("step", f"{info['step']}/{info['total_steps']}")
    if info["loss"] is not None:
        t.add_row("loss", f"{info['loss']:.4f}")
    if info["tokens_per_s"]:
        t.add_row("tokens/s", f"{info['tokens_per_s']:,.0f}")
    t.add_row("elapsed", fmt_duration(info["elapsed_s"]))
    if info["state"] == "running":
        t.add_row("ETA", fmt_duration(info["eta_s"]))
    if info["spent"] is not None:
        t.add_row("spend", f"{info['spent']:.2f} {info['currency']} (projected {info['projected']:.2f})")
    if info["error"]:
        t.add_row("error", escape(f"{info['error']['error_class']}: {info['error']['message']}"))
    if info["fetched_to"]:
        t.add_row("fetched to", info["fetched_to"])
    console.print(t)


@app.command("ls")
def list_jobs(as_json: JsonOpt = False) -> None:
    """List the jobs in the local ledger, newest first (no network)."""
    import time

    records = Ledger().all()
    if as_json:
        _print_json([r.as_dict() for r in records])
        return
    if not records:
        console.print("no jobs yet; submit one with `autodl-run submit job.toml`")
        return
    t = Table("job", "instance", "state", "submitted", "fetched")
    for r in records:
        t.add_row(
            r.id, r.spec.instance.describe(), r.state,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.submitted_at)), "yes" if r.fetched_to else "",
        )
    console.print(t)


@app.command()
def fetch(
    job: JobId = None,
    to: Annotated[Path | None, typer.Option(help="folder to fetch into (default: the spec's fetch.to)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pull the final LoRA adapter back and verify it against the worker's sha256 manifest."""
    from client.fetch import LOAD_SNIPPET
    from client.fetch import fetch as do_fetch

    ledger = Ledger()
    record = ledger.get(job)
    dest, digest = do_fetch(record, ledger, to)
    if as_json:
        _print_json({"job_id": record.id, "adapter": str(dest), "manifest_sha256": digest, "verified": True})
        return
    console.print(f"[green]✓[/] adapter verified (manifest sha256 {digest[:16]}…) → {escape(str(dest))}")
    console.print("Load it with:")
    console.print(escape(LOAD_SNIPPET.format(base=record.spec.model.name_or_path, adapter=dest)))


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="job id or a unique prefix")]) -> None:
    """Stop a job on its instance (the worker saves nothing further; checkpoints stay)."""
    from client import launcher
    from client.submit import layout_for
    from client.transport import connect

    ledger = Ledger()
    record = ledger.get(job)
    transport = connect(record.spec.instance)
    try:
        launcher.cancel(
            transport, layout_for(record.spec).job(record.id), socket=record.spec.instance.tmux_socket,
            session=record.id,
        )
    finally:
        transport.close()
    ledger.update(record.id, state="cancelled")
    console.print(f"cancelled {record.id}")


@app.command()
def init(
    dest: Annotated[Path, typer.Argument(help="where to write the example")] = Path("job.toml"),
) -> None:
    """Write a commented example job.toml to start from."""
    if dest.exists():
        raise AutodlRunError(f"{dest} already exists", hint="give another path")
    shutil.copy(Path(__file__).parent / "example_job.toml", dest)
    console.print(f"wrote {dest}; edit it, then `autodl-run check {dest}`")


def main() -> None:
    try:
        app(standalone_mode=False)
    except AutodlRunError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; a launched job keeps running on its instance (`autodl-run tail` reattaches)")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
