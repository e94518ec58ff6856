"""What a job is: the `job.toml` schema, the remote layout, and the event protocol.

This is the only package both the laptop side (`client`) and the GPU side
(`remote_worker`) import. It needs pydantic and the standard library only.
"""
