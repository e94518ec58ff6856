"""Everything a person reads, drawn from what the library returns.

    render      the live panel and one-line event renderings (client.progress folds the events)
    jobs        submit steps, status, ls, fetch, cancel, recover
    doctor      the readiness table; instances: login and trust; dataset: check and the prepare report
    log         the library's plain `log` messages
    text        text from the instance made safe to show (control characters escaped)

May import anything in `client`; only `client.cli` (and the live `tail`) import views.
Anything that came from the instance goes through `text.shown` before it is printed.
"""
