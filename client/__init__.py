"""autodl-run, the laptop side: CLI, spec loading, dataset preparation, transport, ledger, fetch."""

__version__ = "0.1.0"
