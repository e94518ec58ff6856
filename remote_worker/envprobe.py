"""What the instance's python has: `python -m remote_worker.envprobe [--requirements JSON] [--torch]`.

Prints one JSON object, jobs.protocol.EnvProbe: the python, the versions of the packages that
matter, which of the given requirements ({import name: pip requirement}) are missing or too old,
and torch's view of the GPUs. Doctor and set-up run it (from the worker bundle, before set-up has
installed anything), so it needs the standard library only: no pydantic, no jobs, and torch is
imported only with `--torch` (or when its metadata is unreadable). `--http URL` times a GET
instead (doctor's reachability check on an instance without curl).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import sys

# Distributions whose versions doctor shows, besides the requirements asked about.
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "flash-attn")


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except Exception:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except Exception:
            return None
    return Requirement


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except Exception:
        return None


def check_requirements(reqs: dict[str, str], out: dict) -> None:
    """Fill out["missing"] (import names) and out["outdated"] ({import name: installed version})."""
    requirement = _requirement_class()
    for mod, req in reqs.items():
        if importlib.util.find_spec(mod) is None:
            out["missing"].append(mod)
            continue
        if requirement is None:
            continue
        r = requirement(req)
        found = version(r.name)
        if found is None:
            continue
        out["packages"][r.name] = found
        if r.specifier and not r.specifier.contains(found, prereleases=True):
            out["outdated"][mod] = found


def torch_info(out: dict) -> None:
    """Import torch: its version, CUDA build and the GPUs it sees (or why it does not import)."""
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = bool(torch.cuda.is_available())
        out["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 1e9, 1),
            }
            for i in range(torch.cuda.device_count())
        ] if out["cuda_available"] else []  # fmt: skip
    except Exception as exc:
        out["torch"] = None
        out["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]


def probe(reqs: dict[str, str], import_torch: bool = False) -> dict:
    out: dict = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "packages": {name: version(name) for name in PACKAGES},
        "missing": [],
        "outdated": {},
        "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
    }
    check_requirements(reqs, out)
    out["torch"] = out["packages"]["torch"]
    if import_torch or (out["torch"] is None and "torch" not in out["missing"]):
        torch_info(out)
    return out


def http(url: str, timeout: float) -> str:
    """`HTTP-CODE SECONDS` of a GET (code 0: no answer), as curl -w prints it (doctor, without curl)."""
    import time
    import urllib.error
    import urllib.request

    t = time.time()
    try:
        code = urllib.request.urlopen(url, timeout=timeout).status
    except urllib.error.HTTPError as e:
        code = e.code
    except Exception:
        code = 0
    return f"{code} {round(time.time() - t, 3)}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m remote_worker.envprobe")
    p.add_argument("--requirements", default="{}", help="JSON: {import name: pip requirement}")
    p.add_argument("--torch", action="store_true", help="import torch: CUDA build and GPUs")
    p.add_argument("--http", metavar="URL", help="instead: time a GET of URL")
    p.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    if a.http:
        print(http(a.http, a.timeout))
        return
    print(json.dumps(probe(json.loads(a.requirements), a.torch)))


if __name__ == "__main__":
    main()
