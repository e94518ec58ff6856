"""Instances and how to reach them: login, host profiles, the tool's own key, doctor."""
