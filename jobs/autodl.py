"""What is true of an AutoDL instance: its paths, its environment, the mirrors that answer from it.

The one place these are spelled; the client (doctor, set-up, hints), the worker (guard, hints) and
the job spec's defaults read them from here.
"""

from __future__ import annotations

DATA_DISK = "/root/autodl-tmp"  # the data disk: large, kept across a shutdown
FS = "/root/autodl-fs"  # the network disk: survives the instance's release
FS_ROOTS = ("~/autodl-fs", FS)
TF_LOGS = "/root/tf-logs"  # the TensorBoard folder AutoDL's panel shows
NETWORK_TURBO = "/etc/network_turbo"  # sourced, sets AutoDL's proxy for downloads
HELP = "/init/others/help"
MARKER_FILES = (HELP, NETWORK_TURBO)  # files only an AutoDL instance has
ENV_VARS = ("AutoDLContainerUUID", "AutoDLRegion", "AutoDLDataCenter")  # set only on an AutoDL instance
HOST_SUFFIXES = (".autodl.com", ".seetacloud.com", ".autodl.art")  # AutoDL's SSH hosts

REMOTE_ROOT = f"{DATA_DISK}/autodl-run"  # instance.remote_root by default
SHUTDOWN = "/usr/bin/shutdown"  # stops AutoDL's billing when run inside the instance

PIP_MIRROR = "https://pypi.tuna.tsinghua.edu.cn/simple"
HF_MIRROR = "https://hf-mirror.com"
