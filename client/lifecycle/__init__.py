"""The verbs a user runs, each a composition of timed steps over one session (client.session).

    pipeline    Step, StepResult, Pipeline: runs and times steps, reports each as data
    steps       the shared steps: connect, sync, setup, model, launch (and what they need)
    submit      check, prepare, connect, sync, setup, model, claim, launch
    resume      the same steps for a job that ran before, from its newest checkpoint
    tail        follow a job, fetch its checkpoints and final adapter, report the guard
    fetch       verified downloads and the acknowledgement; autofetch: the same in the background
    recover     ledger rows from an instance's launch.json, with this laptop's own spec

May import everything in `client` below it (remote, transport, dataset, ledger, session, progress)
and `jobs`; never another verb's private helpers (what two verbs share is a step in `steps`), and
never `client.views` or `client.cli`: results are returned as data, progress goes to `log`/`report`.
"""
