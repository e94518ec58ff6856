"""The job on the instance, seen from the laptop: one module for each kind of thing that crosses.

    bundle      the worker code, staged here and sent once (content-addressed); `script()` reads jobs/scripts
    sync        content-addressed uploads, complete or absent
    setup       the worker's packages on the instance (remote_worker.envprobe), tmux
    prefetch    the model download before launch (remote_worker.prefetch), followed
    launcher    start, look at and stop a process in a job folder, under tmux or setsid (jobs/scripts/job_*.sh)
    follow      read a job file from a byte offset, with the job's state (jobs.jobstate)
    guard       start the guard beside a job, read its status (remote_worker.guard)
    submission  one launch per submission: launch.json and submissions/<key> under the instance's lock

Owns every command this side runs on the instance. May import `jobs`, `client.transport`,
`client.errors` and `client.home`; never `client.lifecycle`, `client.views` or `client.cli`.
Everything it reads back is parsed with a jobs.protocol model or checked (jobs.safepath).
"""
