"""The lifecycle verbs (submit, resume, tail, fetch) composed of timed steps over one session."""
