"""The `autodl-run` command line. The only place errors become exit codes.

Exit codes: 0 ok · 1 unexpected error · 2 bad job spec · 3 bad dataset · 4 cannot reach or talk to
the instance · 5 the instance lacks something · 6 the job failed / is unknown / in the wrong state ·
7 a fetched file failed verification · 8 the local job ledger is damaged · 130 interrupted.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from client import __version__
from client.errors import AutodlRunError
from client.ledger import Ledger

if TYPE_CHECKING:
    from client.lifecycle.pipeline import StepResult

EXIT_CODES = """Exit codes: 0 ok, 1 unexpected error, 2 bad job spec or usage, 3 bad dataset, 4 cannot reach or talk
to the instance, 5 the instance lacks something, 6 the job failed or is unknown, 7 a fetched file failed
verification, 8 the local job ledger is damaged (`autodl-run ledger repair`), 130 interrupted."""
INTERRUPTED = "interrupted; a launched job keeps running on its instance (`autodl-run tail` reattaches)"

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
DeadlineOpt = Annotated[
    str | None,
    typer.Option(
        "--deadline",
        help="stop in time to save and fetch before this: a duration (90m, 3h, 1h30m), a time (18:30) or a "
        "date and time (2026-12-01 18:00); the sooner of it and instance.expires_at counts",
    ),
]


def _deadline(text: str | None) -> float | None:
    from client.errors import SpecError
    from client.lifecycle.submit import parse_deadline

    if text is None:
        return None
    try:
        return parse_deadline(text)
    except ValueError as exc:
        raise SpecError(f"--deadline: {exc}", []) from None


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _log(msg: str) -> None:
    err_console.print(msg)


def _step(result: StepResult) -> None:
    """A finished lifecycle step (client.lifecycle.pipeline.StepResult): ✓ name, seconds, its detail."""
    err_console.print(f"[green]✓[/] {result.name:<8} {result.seconds:6.2f}s")
    if result.detail:
        err_console.print(f"  {escape(result.detail)}")


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
    deadline: DeadlineOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check, prepare, upload and launch a job on its instance (under tmux); print the job id.

    The same job submitted again while it runs is reattached to, not launched twice."""
    from client.lifecycle.submit import submit as do_submit

    ledger = Ledger()
    result = do_submit(job_file, ledger=ledger, log=_log, report=_step, deadline_unix=_deadline(deadline))
    if as_json:
        _print_json(result.as_dict())
    else:
        console.print(f"[bold]{result.job_id}[/]")
        _log(f"follow it with: autodl-run tail {result.job_id}")
    if follow:
        _tail(ledger, result.job_id, raw=False, as_json=False)


def _tail(ledger: Ledger, job: str | None, raw: bool, as_json: bool, fetch: bool = True) -> None:
    from client.lifecycle.tail import tail as do_tail

    record = ledger.get(job)
    progress = do_tail(record, ledger, console, raw=raw, as_json=as_json, fetch=fetch)
    if not as_json and not raw and progress.done:
        where = progress.laptop or f"on the instance; fetch it with: autodl-run fetch {record.id}"
        _log(f"[green]✓[/] {record.id} done; {escape(where)}")


@app.command()
def tail(
    job: JobId = None,
    raw: Annotated[bool, typer.Option("--raw", help="stream the worker's log instead of the progress view")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the events as JSON lines")] = False,
    no_fetch: Annotated[
        bool, typer.Option("--no-fetch", help="do not fetch checkpoints' adapters nor the final adapter")
    ] = False,
) -> None:
    """Follow a job live: step, loss, lr, tokens/s, ETA, memory, spend. Reconnects by itself.

    Meanwhile each new checkpoint's adapter is fetched in the background, and the final adapter is
    fetched and verified when the job ends (then the instance's guard may shut it down)."""
    _tail(Ledger(), job, raw, as_json, fetch=not no_fetch)


@app.command()
def status(job: JobId = None, as_json: JsonOpt = False) -> None:
    """Show where a job stands (asks the instance once)."""
    from client.lifecycle.tail import status as do_status
    from client.views.render import fmt_duration
    from client.views.text import shown  # what the instance wrote: no control characters, no markup

    ledger = Ledger()
    info = do_status(ledger.get(job), ledger).as_dict()
    if as_json:
        _print_json(info)
        return
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("job", info["id"])
    t.add_row("instance", info["instance"])
    t.add_row("state", info["state"])
    t.add_row("phase", escape(shown(info["phase"])))
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
        t.add_row("error", escape(shown(f"{info['error']['error_class']}: {info['error']['message']}")))
    if info.get("checkpoint"):
        t.add_row("checkpoint", escape(shown(f"step {info['checkpoint']['step']}: {info['checkpoint']['path']}")))
    if info["fetched_to"]:
        t.add_row("fetched to", info["fetched_to"])
    if info.get("guard"):
        t.add_row("guard", escape(shown(info["guard"])))
    if info.get("warning"):
        t.add_row("warning", escape(shown(info["warning"])))
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
    t = Table("instance", "state", "submitted", "fetched")
    # The id is what people copy into the next command: never cut it short.
    t.columns.insert(0, Column("job", no_wrap=True, overflow="fold", min_width=max(len(r.id) for r in records)))
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
    checkpoints: Annotated[
        bool,
        typer.Option(
            "--checkpoints", help="also the newest checkpoint, whole with its optimizer state (to resume elsewhere)"
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pull the final LoRA adapter back and verify it against the worker's sha256 manifest."""
    from client.lifecycle.fetch import LOAD_SNIPPET, fetch_all

    ledger = Ledger()
    record = ledger.get(job)
    result = fetch_all(record, ledger, to, checkpoints=checkpoints)
    if as_json:
        _print_json(result.as_dict())
        return
    if result.checkpoint:
        c = result.checkpoint
        console.print(f"[green]✓[/] checkpoint step-{c.step} verified, whole → {escape(str(c.path))}")
    if result.adapter:
        digest, dest = result.manifest_sha256, str(result.adapter)
        console.print(f"[green]✓[/] adapter verified (manifest sha256 {digest[:16]}…) → {escape(dest)}")
        console.print("Load it with:")
        console.print(escape(LOAD_SNIPPET.format(base=record.spec.model.name_or_path, adapter=dest)))


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="job id or a unique prefix")]) -> None:
    """Stop a job on its instance: it saves a checkpoint first (`autodl-run resume` continues it)."""
    from client.errors import JobError
    from client.remote import launcher
    from client.session import open_session
    from jobs.protocol import JobState

    ledger = Ledger()
    record = ledger.get(job)
    with open_session(record) as session:
        transport, paths = session.transport, session.layout.job(record.id)
        before = launcher.job_status(transport, paths)
        if not before.active:
            raise JobError(
                f"job {record.id} already ended ({before.state}) on {transport.where}: nothing to cancel",
                hint=f"`autodl-run status {record.id}` shows how it ended",
            )
        after = launcher.cancel(
            transport, paths, socket=record.spec.instance.tmux_socket,
            session=record.id, grace=120,  # SIGINT, then the worker finishes its step and saves a checkpoint
        )  # fmt: skip
    ledger.update(record.id, state=after.state.value)
    if after.state is JobState.CANCELLED:
        console.print(f"cancelled {record.id}")
    else:
        console.print(f"{record.id} ended as {after.state} before it could be cancelled")


@app.command()
def resume(
    job: Annotated[str, typer.Argument(help="job id or a unique prefix")],
    instance_from: Annotated[
        Path | None,
        typer.Option(
            "--instance-from",
            help="continue on another instance: the [instance] table of this TOML file (a job.toml works)",
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="continue on another instance: a host saved by `autodl-run login`")
    ] = None,
    deadline: DeadlineOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="then follow it like `tail`")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue a job from its last checkpoint: global step, LR schedule, data order and RNG continue.

    On its own instance it restarts in place; on another one (--instance-from, --profile) the checkpoint
    fetched last is uploaded there and the job continues under a new id. A running job is reattached to."""
    from client.lifecycle.resume import instance_for_profile, instance_from_file
    from client.lifecycle.resume import resume as do_resume

    if instance_from and profile:
        from client.errors import SpecError

        raise SpecError("give --instance-from or --profile, not both", [])
    ledger = Ledger()
    record = ledger.get(job)
    instance = None
    if instance_from:
        instance = instance_from_file(instance_from)
    elif profile:
        instance = instance_for_profile(record.spec.instance, profile)
    result = do_resume(record, ledger, instance=instance, deadline_unix=_deadline(deadline), log=_log, report=_step)
    if as_json:
        _print_json(result.as_dict())
    else:
        console.print(f"[bold]{result.job_id}[/]")
    if follow:
        _tail(ledger, result.job_id, raw=False, as_json=False)


@app.command()
def recover(
    instance_file: Annotated[
        Path, typer.Argument(metavar="JOB.toml", help="a job.toml (or any TOML with an [instance] table) of the instance")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Add the jobs an instance knows and this laptop does not (a cut link, another laptop, a repaired ledger).

    Reads each job's launch.json there (the instance's own record); an unreadable one is skipped and named."""
    from client.lifecycle.recover import recover as do_recover

    result = do_recover(instance_file, Ledger(), log=_log)
    if as_json:
        _print_json(result.as_dict())
        return
    for job_id in result.added:
        console.print(f"[green]✓[/] added {job_id}")
    for why in result.skipped:
        _log(f"[yellow]skipped[/] {escape(why)}")
    console.print(f"{len(result.added)} job(s) added, {len(result.known)} known already, "
                  f"{len(result.skipped)} skipped")  # fmt: skip


ledger_app = typer.Typer(help="The local job ledger ($AUTODL_RUN_HOME/ledger.sqlite).", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("repair")
def ledger_repair() -> None:
    """Move a damaged ledger aside and start a fresh one, keeping every job that can still be read."""
    from client.ledger import repair

    aside, kept = repair()
    if aside is None:
        console.print("there was no ledger: started a fresh one")
        return
    console.print(f"moved the damaged ledger to {escape(str(aside))}; the fresh one keeps {kept} job(s)")
    console.print("add back the jobs each instance knows: autodl-run recover JOB.toml")


@app.command()
def init(
    dest: Annotated[Path, typer.Argument(help="where to write the example")] = Path("job.toml"),
) -> None:
    """Write a commented example job.toml to start from."""
    if dest.exists():
        raise AutodlRunError(f"{dest} already exists", hint="give another path")
    shutil.copy(Path(__file__).parent / "example_job.toml", dest)
    console.print(f"wrote {dest}; edit it, then `autodl-run check {dest}`")


# -- instances: login, doctor, trust (client/instances/login.py, client/instances/doctor.py) --------------------------


@app.command()
def login(
    command: Annotated[str, typer.Argument(metavar="COMMAND", help='the login command from the console, in quotes: "ssh -p PORT root@HOST"')],
    name: Annotated[str | None, typer.Option("--name", help="the profile's name (default: from the host)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Log in once with the password (prompt, or $AUTODL_RUN_PASSWORD), install a key, save a host profile.

    Then use it in a job as [instance] profile = "NAME". Run it again after a power cycle changed the
    port or the password: the profile is updated and its jobs follow it.
    """
    from client.instances.login import login as do_login

    result = do_login(command, name, log=_log)
    if as_json:
        _print_json(result.as_dict())
        return
    p = result.profile
    verb = "created" if result.created else "updated"
    changed = "".join(f", {k} {old} → {new}" for k, (old, new) in result.changes.items())
    console.print(f"[green]✓[/] profile [bold]{escape(p.name)}[/] {verb}: {escape(p.where)}{escape(changed)}")
    console.print(f"  key {escape(p.identity_file)} {'installed' if result.key_added else 'already authorized'}"
                  f"{' (the password was used once, not stored)' if result.used_password else ''}")  # fmt: skip
    console.print(f"  host key {escape(result.host_key)} pinned in {escape(str(p.known_hosts))}")
    console.print(escape(f'  use it in a job: [instance] profile = "{p.name}"; check it: autodl-run doctor {p.name}'))


@app.command()
def doctor(
    target: Annotated[str | None, typer.Argument(metavar="TARGET", help="a profile name or a job.toml (default: the last profile)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check an instance in one round trip: python, torch/CUDA, GPU, disks, packages, tmux, rsync, mirrors, clock.

    Exits 5 when a check failed; each failure comes with its fix.
    """
    from client.instances.doctor import doctor as do_doctor
    from client.instances.doctor import render

    report = do_doctor(target)
    if as_json:
        _print_json(report)
    else:
        render(report, console)
    if not report["ok"]:
        from client.errors import RemoteEnvError

        failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
        raise RemoteEnvError(f"{report['target']}: {len(failed)} check(s) failed: {', '.join(failed)}",
                             hint="each one's fix is in the table (or the JSON's checks[].hint)")  # fmt: skip


@app.command()
def trust(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="a profile name, or a host")],
    port: Annotated[int | None, typer.Option(help="the host's ssh port (for a host, not a profile)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pin the host key an instance presents now, replacing the one pinned before.

    Only after a host-key error, and only if you know the instance was re-created behind the same address.
    """
    from client.instances.login import trust as do_trust

    info = do_trust(target, port)
    if as_json:
        _print_json(info)
        return
    was = ", ".join(info["old"]) or "nothing"
    if info["changed"]:
        console.print(f"[green]✓[/] {escape(target)} ({info['address']}): pinned {info['new']} (was: {escape(was)})")
    else:
        console.print(f"[green]✓[/] {escape(target)} ({info['address']}): unchanged, {info['new']}")


def main() -> None:
    try:
        # typer turns Ctrl-C into Exit(130) and, with standalone_mode=False, returns that code
        rc = app(standalone_mode=False)
    except AutodlRunError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        rc = 130
    except typer.Exit as exc:
        rc = exc.exit_code
    except Exception as exc:
        # Usage errors (unknown option, missing argument) and Ctrl-C at a prompt. typer vendors its own
        # click, so match by shape rather than by click's classes.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            rc = 130
        elif type(exc).__name__ == "Exit" and isinstance(getattr(exc, "exit_code", None), int):
            rc = exc.exit_code
        else:
            raise
    if rc == 130:
        err_console.print(INTERRUPTED)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
