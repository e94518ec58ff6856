"""remote_worker.nodewatch: the watch of node 0 from the other nodes, with a probe that answers as told."""

from __future__ import annotations

import socket

from remote_worker import nodewatch


def test_a_node_0_that_stops_answering_is_lost_once():
    answers = iter([True, True, False])
    lost: list[float] = []
    nodewatch.watch("10.0.0.1", 29400, 0.0, lost.append, interval=0.001, probe=lambda h, p: next(answers, False))
    assert len(lost) == 1 and next(answers, None) is None, "it was lost after the answers ran out, not before"


def test_reachable_is_a_tcp_connect():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert nodewatch.reachable("127.0.0.1", port, timeout=5)
    assert not nodewatch.reachable("127.0.0.1", port, timeout=5)


def test_only_the_other_nodes_of_several_watch():
    assert nodewatch.start(0, 2, "127.0.0.1", 1, "/none/job.json") is None
    assert nodewatch.start(1, 1, "127.0.0.1", 1, "/none/job.json") is None


def test_the_lost_event_names_node_0_and_what_to_do():
    e = nodewatch.lost_event("j-1", 2, "10.0.0.1", 29400, 301, 300)
    assert e.error_class == "NodeLost" and "10.0.0.1:29400" in e.message and "node 2 stopped" in e.message
    assert "`autodl-run resume j-1`" in e.hint and "`autodl-run cancel j-1`" in e.hint
