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

from client import __version__
from client.errors import AutodlRunError
from client.ledger import Ledger
from client.views import jobs as jobs_view
from client.views.log import printer
from client.views.text import shown

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


_log = printer(err_console)  # the library's progress messages: plain text, never markup


def _step(result: StepResult) -> None:
    jobs_view.step(result, err_console)


def _progress():
    """The long steps' progress (client.activity) on stderr: a live bar in a terminal, one line each piped."""
    from client.views.progress import showing

    return showing(err_console)


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        console.print(f"autodl-run {__version__}")
        raise typer.Exit()


GpuOpt = Annotated[
    list[str] | None,
    typer.Option("--gpu", help="a card of the plan's table (RTX 4090, A800 80GB, ...); repeat for several"),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="the model's config.json (or its folder) on this laptop, instead of model.name_or_path"),
]


@app.command()
def check(job_file: JobFile, gpu: GpuOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Validate the job spec and the dataset, without any network. Reports every error at once.

    With --gpu NAME, also plans the job for that card and refuses it (exit 5) when it cannot fit; that reads
    the model's config.json (--config, a local path, the cache, or one small download)."""
    from client import dataset
    from client.specfile import load_spec
    from client.views.dataset import check_summary

    spec = load_spec(job_file)
    with _progress():
        report = dataset.check(spec, job_file.resolve())
    planned = None
    if gpu:
        from client.plan import check_fits

        planned = check_fits(spec, job_file.resolve(), report, gpu, config)
    if as_json:
        out = {"ok": True, "name": spec.name, "instance": spec.instance.describe(), "dataset": report}
        if planned is not None:
            out["plan"] = planned.as_dict()
        _print_json(out)
        return
    check_summary(str(job_file), spec.name, spec.instance.describe(), report, console)
    if planned is not None:
        from client.views.plan import render

        render(planned, console)


@app.command()
def plan(
    job_file: JobFile,
    gpu: GpuOpt = None,
    gpus: Annotated[
        int | None,
        typer.Option("--gpus", min=1, help="GPUs a card row trains on (default: train.gpus; \"all\" counts as 1 here)"),
    ] = None,
    deadline: DeadlineOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Before renting: for each card, predicted peak memory, tokens/s, time and CNY, and whether it fits.

    Offline but for one small download of the model's config.json (cached; or --config). Prepares the dataset
    for its real token counts. Names the cheapest card that fits (and meets --deadline), or what to change."""
    from client.plan import plan_job
    from client.views.plan import render

    result = plan_job(job_file, gpu or [], gpus, _deadline(deadline), config)
    if as_json:
        _print_json(result.as_dict())
        return
    render(result, console)


@app.command()
def prepare(
    job_file: JobFile,
    show: Annotated[int, typer.Option(help="print N examples as the model sees them, trained tokens highlighted ([[...]] when not a terminal)")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Prepare the dataset locally: canonical jsonl, checked, with token statistics (no GPU is paid for)."""
    from client import dataset
    from client.home import prepared_dir
    from client.specfile import load_spec
    from client.views.dataset import render_examples, render_report

    spec = load_spec(job_file)
    with _progress():
        prepared = dataset.prepare(spec, job_file.resolve(), prepared_dir())
    if as_json:
        _print_json(prepared.report)
        return
    render_report(prepared.report, console)
    if show:
        render_examples(prepared, None, show, console)


@app.command()
def submit(
    job_file: JobFile,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="then follow it like `tail`, exit with its outcome")] = False,
    deadline: DeadlineOpt = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="plan for this card instead of the one the instance reports")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check, prepare, upload and launch a job on its instance (under tmux); print the job id.

    Before uploading anything it plans the job for the instance's GPU and stops when it cannot fit.

    The same job submitted again while it runs is reattached to, not launched twice."""
    from client.lifecycle.submit import submit as do_submit

    ledger = Ledger()
    with _progress():
        result = do_submit(job_file, ledger=ledger, log=_log, report=_step, deadline_unix=_deadline(deadline), gpu=gpu)
    if as_json:
        _print_json(result.as_dict())
    else:
        jobs_view.job_id(result.job_id, console)
        _log(f"follow it with: autodl-run tail {result.job_id}")
    if follow:
        _tail(ledger, result.job_id, raw=False, as_json=False)


def _tail(ledger: Ledger, job: str | None, raw: bool, as_json: bool, fetch: bool = True) -> None:
    from client.lifecycle.tail import tail as do_tail

    record = ledger.get(job)
    progress = do_tail(record, ledger, console, raw=raw, as_json=as_json, fetch=fetch)
    if not as_json and not raw and progress.done:
        where = progress.laptop or f"on the instance; fetch it with: autodl-run fetch {record.id}"
        jobs_view.done(record.id, where, err_console)
        if record.spec.eval is not None and record.spec.eval.at_end:
            _fetch_eval_at_end(record)
        fetched_to = ledger.get(record.id).fetched_to
        if fetched_to and (Path(fetched_to) / "adapter_config.json").is_file():
            from client.lifecycle.fetch import load_snippet

            jobs_view.load_with(load_snippet(Path(fetched_to), record.spec.model.name_or_path), err_console)


def _fetch_eval_at_end(record) -> None:
    """`[eval] at_end`: the worker evaluates after its `done` event; fetch that result (the guard waits for it)."""
    from client.lifecycle.evaluate import fetch_eval
    from client.session import open_session
    from client.views.post import evaluated

    try:
        with open_session(record) as session:
            evaluated(fetch_eval(record, session=session, wait_s=3600), err_console)
    except AutodlRunError as exc:
        _log(f"the eval at the end was not fetched: {exc}; run: autodl-run eval {record.id}")


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
    """Show where a job stands (asks the instance once; a job that ended, from its record on the laptop)."""
    from client.lifecycle.tail import status as do_status

    ledger = Ledger()
    info = do_status(ledger.get(job), ledger).as_dict()
    if as_json:
        _print_json(info)
        return
    jobs_view.status(info, console)


@app.command("ls")
def list_jobs(as_json: JsonOpt = False) -> None:
    """List the jobs in the local ledger, newest first (no network)."""
    records = Ledger().all()
    if as_json:
        _print_json([r.as_dict() for r in records])
        return
    jobs_view.jobs(records, console)


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
    """Pull the final LoRA adapter back and verify it against the worker's sha256 manifest.

    The job's record (events, log, trainer state, evaluations, TensorBoard files) comes too, into
    `<job id>/record/`, with a run report (report.md and PNG plots) whose path it prints."""
    from client.lifecycle.fetch import fetch_all, load_snippet

    ledger = Ledger()
    record = ledger.get(job)
    with _progress():
        result = fetch_all(record, ledger, to, checkpoints=checkpoints)
    if as_json:
        _print_json(result.as_dict())
        return
    snippet = load_snippet(result.adapter, record.spec.model.name_or_path) if result.adapter else ""
    jobs_view.fetched(result, snippet, console)


HereOpt = Annotated[bool, typer.Option("--here", help="run on this machine from the fetched adapter, not on the instance")]
BaseOpt = Annotated[str | None, typer.Option("--base-model", help="where the base model is (default: the adapter's)")]


@app.command("eval")
def eval_(
    job: JobId = None,
    prompts: Annotated[Path | None, typer.Option(help="a prompts file (jsonl or one prompt a line); default: the eval split")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="default: [eval] max_new_tokens, else 256")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many prompts (default: [eval] limit, else 50)")] = None,
    here: HereOpt = False,
    base_model: BaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answers of the base and the tuned model side by side on held-out prompts, with loss, exact match, ROUGE-L.

    Runs on the instance's GPU (or --here); the result lands in <fetch.to>/<job id>/eval/ (eval.md, eval.json), verified."""
    from client.lifecycle.evaluate import evaluate
    from client.views.post import evaluated

    record = Ledger().get(job)
    result = evaluate(record, here=here, prompts=prompts, base=base_model, max_new_tokens=max_new_tokens,
                      limit=limit, log=_log)  # fmt: skip
    if as_json:
        _print_json(result.as_dict())
        return
    evaluated(result, console)


@app.command()
def chat(
    job: JobId = None,
    base: Annotated[bool, typer.Option("--base", help="talk to the base model alone (adapter off)")] = False,
    here: HereOpt = False,
    base_model: BaseOpt = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="the longest answer (default 512)")] = None,
) -> None:
    """Talk to the tuned model in this terminal (streamed), with the chat template and stop tokens of training.

    Runs on the instance (or --here, from the fetched adapter); /reset starts over, /exit or Ctrl-D quits."""
    from client.lifecycle.chat import chat as do_chat

    rc = do_chat(Ledger().get(job), use_base=base, here=here, base=base_model, max_new_tokens=max_new_tokens, log=_log)
    if rc:
        raise typer.Exit(rc)


@app.command("export")
def export_(
    job: JobId = None,
    merged: Annotated[bool, typer.Option("--merged", help="a merged 16-bit safetensors model")] = False,
    gguf: Annotated[str | None, typer.Option("--gguf", help="a GGUF file: f16, bf16, f32, q8_0, q5_0, q4_0 (for K-quants: llama-quantize the f16 file)")] = None,
    ollama: Annotated[str | None, typer.Option("--ollama", help="a GGUF file of this type plus an Ollama Modelfile")] = None,
    here: HereOpt = False,
    base_model: BaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge the adapter into its base (the 16-bit weights, also for QLoRA) and export it, checked against PEFT.

    Runs on the instance (or --here); the files land in <fetch.to>/<job id>/export/<what>/, verified."""
    from client.lifecycle.export import export as do_export
    from client.views.post import exported

    chosen = [k for k, v in (("merged", merged), ("gguf", gguf), ("ollama", ollama)) if v]
    if len(chosen) != 1:
        from client.errors import SpecError

        raise SpecError("give one of --merged, --gguf TYPE, --ollama TYPE", [])
    kind = chosen[0]
    result = do_export(Ledger().get(job), kind, gguf or ollama or "", here=here, base=base_model, log=_log)
    if as_json:
        _print_json(result.as_dict())
        return
    exported(result, console)


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="job id or a unique prefix")]) -> None:
    """Stop a job on its instance (and its other nodes): it saves a checkpoint first (`autodl-run resume` continues it)."""
    from client.lifecycle.cancel import cancel_nodes, nothing_to_cancel

    ledger = Ledger()
    record = ledger.get(job)
    nodes = cancel_nodes(record, grace=120)  # SIGINT, then the worker finishes its step and saves a checkpoint
    first, others = nodes[0], nodes[1:]
    jobs_view.nodes_cancelled(record.id, others, console, err_console)
    if first.error is not None:
        raise first.error
    refused = nothing_to_cancel(record, nodes)
    if refused is not None:
        raise refused
    if first.after is not None:
        ledger.update(record.id, state=first.after.value)
    state = first.after or first.before
    jobs_view.cancelled(record.id, state.value if state is not None else "unknown", console)


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
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help='train.gpus for this run (N or "all"): the checkpoint\'s global batch is kept, so N x nodes must '
            "divide its micro-batches a step, and N is at most the GPUs it has (CPU cores on a CPU job) (docs/multigpu.md)",
        ),
    ] = None,
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
    with _progress():
        result = do_resume(record, ledger, instance=instance, deadline_unix=_deadline(deadline), gpus=gpus, log=_log,
                           report=_step)  # fmt: skip
    if as_json:
        _print_json(result.as_dict())
    else:
        jobs_view.job_id(result.job_id, console)
    if follow:
        _tail(ledger, result.job_id, raw=False, as_json=False)


@app.command()
def recover(
    instance_file: Annotated[
        Path, typer.Argument(metavar="JOB.toml", help="the job.toml the jobs were submitted with")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Add the jobs an instance knows and this laptop does not (a cut link, another laptop, a repaired ledger).

    Reads each job's launch.json there (the instance's own record of which jobs exist); an unreadable one
    is skipped and named. The jobs get JOB.toml's own spec: the instance never chooses where the laptop
    writes or what it reads; jobs launched under another name are skipped."""
    from client.lifecycle.recover import recover as do_recover

    result = do_recover(instance_file, Ledger(), log=_log)
    if as_json:
        _print_json(result.as_dict())
        return
    jobs_view.recovered(result.as_dict(), console, err_console)


@app.command("rm")
def remove_jobs(
    jobs: Annotated[list[str], typer.Argument(help="job ids or unique prefixes", show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask before deleting")] = False,
    local_only: Annotated[
        bool, typer.Option("--local-only", help="forget them on the laptop only; their folders on the instance stay")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove old jobs: their row in the ledger and their folder on the instance (asks first).

    A running job is refused (cancel it first). Only the job's own folder there is deleted; what the
    laptop fetched (the adapter under fetch.to) is kept."""
    from client.errors import SpecError
    from client.lifecycle.remove import job_folder, remove

    ledger = Ledger()
    records = list({r.id: r for r in (ledger.get(j) for j in jobs)}.values())
    if not yes:
        for r in records:
            there = "" if local_only else f" and {job_folder(r)} on {r.spec.instance.describe()}"
            err_console.print(f"{escape(r.id)} ({escape(r.state)}): its ledger row{escape(there)}")
        if not sys.stdin.isatty():
            raise SpecError("rm: not deleting without a yes: stdin is not a terminal", [],
                            hint="add --yes to delete without asking")  # fmt: skip
        if not typer.confirm(f"delete {len(records)} job(s)?", default=False, err=True):
            err_console.print("nothing deleted")
            raise typer.Exit(1)
    result = remove(records, ledger, local_only=local_only)
    if as_json:
        _print_json(result.as_dict())
        return
    jobs_view.removed(result.as_dict(), console)


@app.command("ssh")
def ssh_shell(
    job: Annotated[str, typer.Argument(help="job id or a unique prefix")],
    command: Annotated[list[str] | None, typer.Argument(help="a command to run there instead of a shell")] = None,
) -> None:
    """Open a shell on the job's instance, in the job's folder (the system ssh, with the host key pinned here).

    After `--`, a command runs there instead: autodl-run ssh JOB -- tail -n 50 worker.log"""
    import os

    from client.instances.shell import shell_command

    cmd = shell_command(Ledger().get(job), list(command or []))
    sys.stdout.flush()
    sys.stderr.flush()
    if cmd.cwd:
        os.chdir(cmd.cwd)
    os.execvp(cmd.argv[0], cmd.argv)


ledger_app = typer.Typer(help="The local job ledger ($AUTODL_RUN_HOME/ledger.sqlite).", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("repair")
def ledger_repair() -> None:
    """Move a damaged ledger aside and start a fresh one, keeping every job that can still be read."""
    from client.ledger import repair

    aside, kept = repair()
    jobs_view.ledger_repaired(aside, kept, console)


@app.command()
def init(
    dest: Annotated[Path, typer.Argument(help="where to write the example (missing folders are created)")] = Path(
        "job.toml"
    ),
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Write a commented example job.toml to start from."""
    from client.errors import SpecError

    if dest.is_dir():
        raise SpecError(f"init: {dest} is a folder; nothing was written", [],
                        hint=f"name the file: autodl-run init {dest / 'job.toml'}")  # fmt: skip
    if dest.exists() and not force:
        raise SpecError(f"init: {dest} already exists; nothing was written", [],
                        hint=f"give another path, or overwrite it: autodl-run init {dest} --force")  # fmt: skip
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(__file__).parent / "example_job.toml", dest)
    except OSError as exc:
        raise SpecError(f"init: cannot write {dest}: {exc.strerror or exc}", [],
                        hint="give a path in a folder you can write to") from None  # fmt: skip
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
    from client.views import instances as view

    result = do_login(command, name, log=_log)
    if as_json:
        _print_json(result.as_dict())
        return
    view.login(result, console)


@app.command()
def doctor(
    target: Annotated[str | None, typer.Argument(metavar="TARGET", help="a saved host (`autodl-run hosts`), a job.toml, or local (this machine); default: the last host logged into")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check an instance in one round trip: python, torch/CUDA, GPU, disks, packages, tmux, rsync, mirrors, clock.

    Exits 5 when a check failed; each failure comes with its fix.
    """
    from client.instances.doctor import doctor as do_doctor
    from client.views.doctor import render

    report = do_doctor(target)
    if as_json:
        _print_json(report.as_dict())
    else:
        render(report, console)
    if not report.ok:
        from client.errors import RemoteEnvError

        failed = [c.name for c in report.failed]
        raise RemoteEnvError(f"{report.target}: {len(failed)} check(s) failed: {', '.join(failed)}",
                             hint="each one's fix is in the table (or the JSON's checks[].hint)")  # fmt: skip


@app.command()
def hosts(as_json: JsonOpt = False) -> None:
    """List the hosts saved by `autodl-run login` (use one in a job as [instance] profile = "NAME")."""
    from client.instances import profiles
    from client.views import instances as view

    saved = sorted(profiles.load_all().values(), key=lambda p: p.updated_at, reverse=True)
    if as_json:
        _print_json([p.as_dict() for p in saved])
        return
    view.hosts(saved, console)


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
    from client.views import instances as view

    result = do_trust(target, port)
    if as_json:
        _print_json(result.as_dict())
        return
    view.trust(result, console)


def main() -> None:
    try:
        # typer turns Ctrl-C into Exit(130) and, with standalone_mode=False, returns that code
        rc = app(standalone_mode=False)
    except AutodlRunError as exc:
        # the message may quote the instance (a command's stderr): its control characters are escaped
        text = "\n".join(shown(line) for line in str(exc).split("\n"))
        err_console.print(f"[red]error:[/] {escape(text)}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        rc = 130
    except typer.Exit as exc:
        rc = exc.exit_code
    except Exception as exc:
        # Usage errors (unknown option, missing argument) and Ctrl-C at a prompt. typer vendors its own
        # click, so match by shape rather than by click's classes.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        if type(exc).__name__ == "Abort":
            rc = 130
        elif type(exc).__name__ == "Exit" and isinstance(code, int):
            rc = code
        else:
            raise
    if rc == 130:
        err_console.print(INTERRUPTED)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
