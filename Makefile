# The two commands a new user needs (both set everything up first):
#   make demo   train SmolLM2-135M for real on this machine's CPU, fetch and verify the adapter
#   make test   the whole test suite (real sshd, rsync, tmux, training)
#   make lint   ruff and the type checker (mypy, configured in pyproject.toml); CI runs it too
.PHONY: setup demo test lint
setup:
	@bash scripts/setup.sh
demo: setup
	.venv/bin/python scripts/demo.py
test: setup
	.venv/bin/python -m pytest -q -n 2
lint: setup
	.venv/bin/ruff check client remote_worker jobs tests scripts bench
	.venv/bin/mypy
