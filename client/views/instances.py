"""`autodl-run login` and `autodl-run trust`: what was saved and pinned."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.instances.login import LoginResult, TrustResult
from client.instances.profiles import Profile
from client.views.text import print_table


def login(result: LoginResult, console: Console) -> None:
    p = result.profile
    verb = "created" if result.created else "updated"
    changed = "".join(f", {k} {old} → {new}" for k, (old, new) in result.changes.items())
    console.print(f"[green]✓[/] profile [bold]{escape(p.name)}[/] {verb}: {escape(p.where)}{escape(changed)}")
    console.print(f"  key {escape(p.identity_file)} {'installed' if result.key_added else 'already authorized'}"
                  f"{' (the password was used once, not stored)' if result.used_password else ''}")  # fmt: skip
    console.print(f"  host key {escape(result.host_key)} pinned in {escape(str(p.known_hosts))}")
    console.print(
        escape(f'  use it in a job: [instance] profile = "{p.name}"; check it: autodl-run doctor {p.name}')
    )


def trust(result: TrustResult, console: Console) -> None:
    where = f"{escape(result.target)} ({escape(result.address)})"
    if result.changed:
        was = ", ".join(result.old) or "nothing"
        console.print(f"[green]✓[/] {where}: pinned {escape(result.new)} (was: {escape(was)})")
    else:
        console.print(f"[green]✓[/] {where}: unchanged, {escape(result.new)}")


def hosts(saved: list[Profile], console: Console) -> None:
    if not saved:
        console.print('no saved hosts yet; save one with: autodl-run login "ssh -p PORT root@HOST"')
        return
    t = Table("name", "where", "key", "updated")
    for p in saved:
        t.add_row(escape(p.name), escape(p.where), escape(p.identity_file), escape(p.updated_at))
    print_table(console, t)
    console.print(escape('use one in a job: [instance] profile = "NAME"; check it: autodl-run doctor NAME'))
