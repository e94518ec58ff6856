"""Fault injection for test_faults.py: a worker whose PYTHONPATH starts with this folder freezes itself
(SIGSTOP) at an exact point of a checkpoint save, so a test acts on it there (SIGKILL, a full disk, a
second submit) without racing the training. Armed by a file in $AUTODL_TEST_STOPS named
`before-step-N` (stop before `checkpoint-N` is renamed to `step-N`: the save is written, not finalized)
or `after-step-N` (stop once `step-N` is complete); each file stops one process once (it is removed),
and the stopped process's pid is written to `stopped-<that name>`."""

import os
import signal

_stops = os.environ.get("AUTODL_TEST_STOPS")


def _install(stops: str) -> None:
    rename, replace = os.rename, os.replace

    def stop(when: str, dst) -> None:
        name = f"{when}-{os.path.basename(os.fspath(dst))}"
        try:
            os.unlink(os.path.join(stops, name))
        except FileNotFoundError:
            return
        with open(os.path.join(stops, f"stopped-{name}.tmp"), "w") as f:
            f.write(str(os.getpid()))
        rename(os.path.join(stops, f"stopped-{name}.tmp"), os.path.join(stops, f"stopped-{name}"))
        os.kill(os.getpid(), signal.SIGSTOP)

    def stopping(move):
        def moving(src, dst, *args, **kwargs):
            stop("before", dst)
            move(src, dst, *args, **kwargs)
            stop("after", dst)

        return moving

    # the worker finalizes a checkpoint by renaming `checkpoint-N` to `step-N` (Path.rename or Path.replace)
    os.rename, os.replace = stopping(rename), stopping(replace)


if _stops:
    _install(_stops)
