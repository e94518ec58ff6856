"""The job spec: every shipped example loads; bad specs report every problem with file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from client.errors import SpecError
from client.specfile import load_spec
from jobs.spec import InstanceSpec, parse_ssh_command

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(ROOT.glob("examples/**/*.toml")) + [ROOT / "client" / "example_job.toml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_spec_loads_and_says_how_to_run_it(path: Path, local_home: Path) -> None:
    # a model in the user's home (the demo's, which `make demo` makes) is there, as after `make demo`:
    # this test must not depend on `make demo` having run on this machine
    model = tomllib.loads(path.read_text()).get("model", {}).get("name_or_path", "")
    if model.startswith("~/"):
        (local_home / model[2:]).mkdir(parents=True)
    spec = load_spec(path)
    assert spec.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run with:") and ("autodl-run" in first or "make demo" in first)


def test_errors_are_all_reported_with_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text(
        'name = "bad name!"\n'
        "[instance]\n"
        'ssh = "ssh -X root@h"\n'
        "[model]\n"
        'name_or_path = "m"\n'
        "[data]\n"
        'train = "d.jsonl"\n'
        "max_lenght = 100\n"
        "[lora]\n"
        "r = 0\n"
    )
    with pytest.raises(SpecError) as exc:
        load_spec(bad)
    got = {(p.line, p.field) for p in exc.value.problems}
    assert got == {(1, "name"), (3, "instance.ssh"), (8, "data.max_lenght"), (10, "lora.r")}
    text = str(exc.value)
    assert f"{bad}:8: data.max_lenght: unknown key" in text
    assert "hint:" in text


def test_missing_section_points_at_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text('name = "x"\n[data]\ntrain = "a.jsonl"\n')
    with pytest.raises(SpecError) as exc:
        load_spec(bad)
    [p] = exc.value.problems
    assert p.field == "model" and p.message == "required, but missing"


def test_toml_syntax_error_has_a_line(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text('name = "x"\n[model]\nname_or_path = unquoted\n')
    with pytest.raises(SpecError) as exc:
        load_spec(bad)
    assert exc.value.problems[0].line == 3


def test_missing_job_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="job file not found") as exc:
        load_spec(tmp_path / "nope.toml")
    assert "autodl-run init" in exc.value.hint


@pytest.mark.parametrize(
    "cmd, expected",
    [
        ("ssh -p 38076 root@region-41.autodl.com", ("region-41.autodl.com", 38076, "root", None)),
        ("ssh root@connect.bjb1.seetacloud.com -p 12345", ("connect.bjb1.seetacloud.com", 12345, "root", None)),
        ("ssh -o Port=2222 -i ~/.ssh/k me@1.2.3.4", ("1.2.3.4", 2222, "me", "~/.ssh/k")),
        ("ssh -p2200 host", ("host", 2200, None, None)),
    ],
)
def test_parse_login_command(cmd: str, expected: tuple) -> None:
    assert parse_ssh_command(cmd) == expected


@pytest.mark.parametrize(
    "cmd, match",
    [
        ("scp x y", 'must start with "ssh"'),
        ("ssh -L 8080:localhost:80 root@h", "unsupported ssh option"),
        ("ssh -o ProxyCommand=x root@h", "only -o Port=N"),
        ("ssh -p 99999 root@h", "bad port"),
        ("ssh root@h rm -rf /", "no remote command"),
        ("ssh -p 22", "no host"),
    ],
)
def test_bad_login_commands_are_rejected(cmd: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_ssh_command(cmd)


def test_instance_defaults_to_local_and_ssh_fills_host() -> None:
    assert InstanceSpec().is_local
    inst = InstanceSpec(ssh="ssh -p 38076 root@region-41.autodl.com")
    assert (inst.host, inst.port, inst.user) == ("region-41.autodl.com", 38076, "root")
    # What the ledger stores must load again.
    assert InstanceSpec.model_validate(inst.model_dump()).port == 38076


def test_job_name_cannot_inject_shell(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text('name = "x; rm -rf ~"\n[model]\nname_or_path = "m"\n[data]\ntrain = "d.jsonl"\n')
    with pytest.raises(SpecError, match="name"):
        load_spec(bad)


def test_an_eval_section_loads_and_refuses_only_its_own_fields() -> None:
    from jobs.spec import EvalSpec, TrainSpec

    assert EvalSpec(max_new_tokens=8).limit == 50  # the merge had put train's batch check here: AttributeError
    with pytest.raises(ValueError, match="global_batch_tokens or global_batch_sequences"):
        TrainSpec(global_batch_tokens=160, global_batch_sequences=8)


def test_train_gpus_is_a_whole_number_or_all_and_all_is_for_gpus_only() -> None:
    """`gpus = true` or "2" silently meant 1 or 2; "all" on the CPU meant one process per core (a breaker's find)."""
    import pytest
    from pydantic import ValidationError

    from jobs.spec import TrainSpec

    assert TrainSpec(gpus=2).gpus == 2 and TrainSpec(gpus="all").gpus == "all"
    for bad in (True, "2", 2.0, 0):
        with pytest.raises(ValidationError):
            TrainSpec(gpus=bad)
    with pytest.raises(ValidationError, match="number of processes"):
        TrainSpec(gpus="all", device="cpu")


def test_more_nodes_need_an_ssh_instance_as_node_0(tmp_path: Path) -> None:
    """host = "local" with instance.hosts passed `check`: the other nodes were told to meet node 0 at "local"."""
    job = tmp_path / "job.toml"
    job.write_text('name = "x"\n[model]\nname_or_path = "m"\n[data]\ntrain = "d.jsonl"\n'
                   '[instance]\nhost = "local"\nhosts = ["ssh -p 22 root@10.0.0.2"]\n')
    with pytest.raises(SpecError, match="instance.hosts") as err:
        load_spec(job)
    assert "SSH instance" in str(err.value) + repr(err.value.problems)
    assert any(p.field == "instance.hosts" and p.line == 8 for p in err.value.problems)
    job.write_text(job.read_text().replace('host = "local"\n', ""))  # local by default: refused too
    with pytest.raises(SpecError, match="instance.hosts"):
        load_spec(job)
    job.write_text(job.read_text().replace("[instance]\n", '[instance]\nssh = "ssh -p 2 root@10.0.0.1"\n'))
    assert load_spec(job).instance.hosts == ["ssh -p 22 root@10.0.0.2"]


def test_more_nodes_from_a_profile_need_the_rendezvous_address() -> None:
    """With `profile` and `hosts` the other nodes were told to meet node 0 at "" (its host is in the profile)."""
    from client.lifecycle.steps import node_of

    with pytest.raises(ValueError, match="instance.rdzv_host"):
        InstanceSpec(profile="gpu", hosts=["ssh -p 22 root@10.0.0.2"])
    inst = InstanceSpec(profile="gpu", hosts=["ssh -p 22 root@10.0.0.2"], rdzv_host="10.0.0.1")
    from jobs.spec import JobSpec

    spec = JobSpec.model_validate({"name": "x", "model": {"name_or_path": "m"}, "data": {"train": "d.jsonl"},
                                   "instance": inst.model_dump()})
    assert node_of(spec, 1).master == "10.0.0.1"
