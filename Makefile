# The two commands a new user needs (both set everything up first):
#   make demo   train SmolLM2-135M for real on this machine's CPU, fetch and verify the adapter
#   make test   the whole test suite (real sshd, rsync, tmux, training)
#   make lint   ruff and the type checker (mypy, configured in pyproject.toml); CI runs it too
.PHONY: setup demo test lint
setup:
	@bash scripts/setup.sh
demo: setup
	.venv/bin/python scripts/demo.py
# three pytest processes on two cores: with -n 2 a third of the CPU sat idle while tests waited on
# connections, polls and timeouts (10m06 at rest, 6f60f30); -n 3 kept it busy (8m57): see the README
test: setup
	.venv/bin/python -m pytest -q -n 3
lint: setup
	.venv/bin/ruff check client remote_worker jobs tests scripts bench
	.venv/bin/mypy
