"""Instances and how to reach them: `login` (a pasted ssh command, the password once, the tool's own
key), host `profiles`, `keys`, and `doctor` (an instance's readiness in one round trip).

May import `jobs`, `client.transport`, `client.remote`, `client.home` and `client.errors`; never
`client.lifecycle`, `client.views` or `client.cli`. Results are typed (`DoctorReport`, `TrustResult`).
"""
