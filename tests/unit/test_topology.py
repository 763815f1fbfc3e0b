"""engine.topology: every stream takes NATS_REPLICAS copies (a 3-server cluster loses a
server and stops no queue)."""

from __future__ import annotations

from engine.topology import Topology


def test_every_stream_takes_the_configured_copies() -> None:
    for replicas in (1, 3):
        configs = Topology("bs", replicas).stream_configs()
        assert configs and {c.num_replicas for c in configs} == {replicas}
