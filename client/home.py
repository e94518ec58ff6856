"""The laptop's own files: everything autodl-run keeps lives under `$AUTODL_RUN_HOME`
(default `~/.autodl-run`). The only place that variable is read.

    ledger.sqlite     the job ledger (client.ledger)
    known_hosts       SSH host keys of instances given by host/port (client.transport.ssh)
    profiles.toml     host profiles; hostkeys/NAME their pinned keys (client.instances.profiles)
    keys/             the tool's own SSH key pair (client.instances.keys)
    prepared/         prepared datasets, content-addressed (client.dataset)
    bundles/          staged worker bundles, content-addressed (client.remote.bundle)
    local/            the remote root of `host = "local"` jobs
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "AUTODL_RUN_HOME"
LEDGER = "ledger.sqlite"
KNOWN_HOSTS = "known_hosts"
PROFILES = "profiles.toml"
HOSTKEYS = "hostkeys"
KEYS = "keys"
PREPARED = "prepared"
BUNDLES = "bundles"  # the laptop's cache of staged bundles, not the instance's (jobs.layout)
LOCAL = "local"


def home() -> Path:
    """$AUTODL_RUN_HOME (default ~/.autodl-run), created if absent."""
    path = Path(os.environ.get(ENV) or Path.home() / ".autodl-run").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def ledger_file() -> Path:
    return home() / LEDGER


def known_hosts_file() -> Path:
    return home() / KNOWN_HOSTS


def profiles_file() -> Path:
    return home() / PROFILES


def hostkeys_dir() -> Path:
    return home() / HOSTKEYS


def keys_dir() -> Path:
    return home() / KEYS


def prepared_dir() -> Path:
    return home() / PREPARED


def bundle_cache() -> Path:
    return home() / BUNDLES


def local_root() -> Path:
    return home() / LOCAL
