"""The contract: everything the laptop (`client`) and the instance (`remote_worker`) both read or write.

    spec       the job.toml schema (JobSpec) and the job file the worker runs (WorkerJob)
    layout     where every file lives on the instance: the only place a remote file name is spelled
    protocol   a model for every file that crosses, enums for states, phases and reasons
    events     the event stream; jobstate: the one rule for a job's state
    manifest   sha256 manifests of a folder; safepath: paths that come from the other side
    tokenize/  records to token ids and loss masks; packing: the one packer; autodl: AutoDL's facts
    scripts/   the shell programs the laptop runs on the instance (package data)

The only package both sides import; it imports neither. It needs pydantic, numpy and the standard
library (tokenize: the tokenizer's own library, lazily). A new crossing file: docs/architecture.md.
"""
