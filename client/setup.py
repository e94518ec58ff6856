"""Setup on the instance: find its python and make sure the worker's packages are there.

One round trip probes every requirement. Missing packages are installed with pip when
`instance.install_deps` is on, with the instance's own torch pinned by a constraint so a
CUDA build that matches the driver is never replaced.
"""

from __future__ import annotations

import json

from client.errors import RemoteEnvError
from client.transport.base import Transport
from jobs.requirements import requirements_for
from jobs.spec import JobSpec

_PROBE = """
import importlib.util, json, sys
mods = json.loads(sys.argv[1])
out = {"python": sys.version.split()[0], "missing": [m for m in mods if importlib.util.find_spec(m) is None]}
try:
    import torch
    out["torch"] = torch.__version__
except Exception:
    out["torch"] = None
print(json.dumps(out))
"""


def probe_python(transport: Transport, spec: JobSpec) -> dict:
    py = spec.instance.python
    reqs = requirements_for(spec.quant.bits)
    res = transport.run([py, "-c", _PROBE, json.dumps(list(reqs))], check=False)
    if not res.ok:
        raise RemoteEnvError(
            f"cannot run `{py}` on {transport.where} (exit {res.exited}): {res.tail(3)}",
            hint="set `instance.python` to the interpreter that has torch, e.g. /root/miniconda3/bin/python",
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def ensure_worker_deps(transport: Transport, spec: JobSpec, log=print) -> dict:
    info = probe_python(transport, spec)
    missing = info["missing"]
    if not missing:
        return info
    reqs = requirements_for(spec.quant.bits)
    wanted = [reqs[m] for m in missing]
    if "torch" in missing:
        raise RemoteEnvError(
            f"`{spec.instance.python}` on {transport.where} has no torch",
            hint="pick an instance image with PyTorch, or point `instance.python` at the python that has it",
        )
    if not spec.instance.install_deps:
        raise RemoteEnvError(
            f"`{spec.instance.python}` on {transport.where} lacks: {', '.join(missing)}",
            hint=f"run `{spec.instance.python} -m pip install {' '.join(wanted)}` there, "
            "or set `instance.install_deps = true`",
        )
    log(f"installing on the instance: {' '.join(wanted)}")
    cmd = (
        f'c=$(mktemp) && echo "torch=={info["torch"]}" > "$c" && '
        f'{_q(spec.instance.python)} -m pip install -q -c "$c" '
        + (f"-i {_q(spec.instance.pip_index_url)} " if spec.instance.pip_index_url else "")
        + " ".join(_q(w) for w in wanted)
    )
    res = transport.run(cmd, check=False, timeout=1800)
    if not res.ok:
        raise RemoteEnvError(
            f"pip could not install {', '.join(missing)} on {transport.where}: {res.tail(5)}",
            hint="set `instance.pip_index_url` to a reachable mirror, e.g. https://pypi.tuna.tsinghua.edu.cn/simple",
        )
    info = probe_python(transport, spec)
    if info["missing"]:
        raise RemoteEnvError(f"still missing after pip install: {', '.join(info['missing'])}")
    return info


def _q(s: str) -> str:
    import shlex

    return shlex.quote(s)
