"""autodl-run, the laptop side.

Wings: `transport/` (the I/O seam), `remote/` (the job on the instance), `lifecycle/` (the verbs),
`instances/` (login, profiles, doctor), `dataset/` (preparation), `plan/` (before renting), `views/` (rendering); at the top,
`cli` (the only place errors become exit codes), `errors`, `ledger`, `session`, `progress`, `home`,
`retry`, `specfile`. Imports `jobs`, never `remote_worker`. docs/architecture.md draws it.
"""

__version__ = "0.1.0"
