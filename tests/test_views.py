"""The views draw what the library returns; text that came from an instance is data, never markup."""

from __future__ import annotations

import io

from rich.console import Console

from client.instances.doctor import BundleInfo, Check, DoctorReport, Findings, parse
from client.instances.login import TrustResult
from client.progress import Progress
from client.views import instances
from client.views.doctor import render
from client.views.log import printer

EVIL = "[bold red]pwned[/] [link=https://evil.example]x[/link] \x1b]0;title\x07"


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, highlight=False, soft_wrap=True), out


def test_log_messages_are_printed_as_text_not_markup() -> None:
    console, out = _console()
    log = printer(console)
    log(f"  downloading: {EVIL}")  # a download's progress line, written by the instance
    log("✓ sync      0.10s")
    text = out.getvalue()
    assert "[bold red]pwned[/]" in text and "[link=https://evil.example]x[/link]" in text
    assert "\x1b" not in text and "\\x1b]0;title\\x07" in text
    assert "✓ sync      0.10s" in text


def test_doctor_table_shows_what_the_instance_said_literally() -> None:
    found = parse("@@os\n" + EVIL + "\nLinux 6.1\n", 0.0, 0.0)
    found.bundle = BundleInfo(dir=None, error=None)
    report = DoctorReport(
        **dict(found), target="gpu1", where="root@h:22", python_setting="python3",
        network_turbo_setting=False, ok=False,
        checks=[Check(name="os", status="info", detail=f"{found.os.name}"), Check(name="gpu", status="fail",
                detail="none", hint="[red]fix[/]")],
    )  # fmt: skip
    console, out = _console()
    render(report, console)
    text = out.getvalue()
    assert "[bold red]pwned[/]" in text and "[red]fix[/]" in text and "\x1b" not in text
    assert "1 problem" in text
    assert report.as_dict()["os"] == {"name": EVIL, "kernel": "Linux 6.1"}
    assert list(report.as_dict())[:2] == ["os", "python"] and list(report.as_dict())[-2:] == ["checks", "ok"]
    assert set(Findings().model_dump()) | {"target", "where", "python_setting", "network_turbo_setting",
                                           "checks", "ok"} == set(report.as_dict())  # fmt: skip


def test_trust_result_keeps_its_json_keys_and_renders() -> None:
    result = TrustResult("gpu1", "gpu1", "h:22", "/kh", ["ED25519 SHA256:old"], "ED25519 SHA256:new")
    assert result.as_dict() == {
        "target": "gpu1", "profile": "gpu1", "address": "h:22", "known_hosts": "/kh",
        "old": ["ED25519 SHA256:old"], "new": "ED25519 SHA256:new", "changed": True,
    }  # fmt: skip
    console, out = _console()
    instances.trust(result, console)
    assert "pinned ED25519 SHA256:new (was: ED25519 SHA256:old)" in out.getvalue()


def test_progress_is_a_model_without_rendering() -> None:
    import client.progress as module

    assert "rich" not in module.__dict__ and not any(n.startswith("rich") for n in vars(module))
    assert Progress("j").as_dict()["phase"] == "waiting for the worker"
