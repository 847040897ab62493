"""A cluster host out of its database stops its task runners a beat before any
other host may take their tasks, once per outage (``cluster.SelfFence``)."""

from __future__ import annotations

from fireclaw.supervisor.cluster import HEARTBEAT, SelfFence


def test_it_fences_a_beat_before_others_may_presume_it_dead_and_once() -> None:
    fence = SelfFence(30.0, now=100.0)
    assert fence.limit == 30.0 - HEARTBEAT
    assert not fence.beat(105.0, ok=True)
    # Out since the beat at 105: not yet at 105 + limit ...
    assert not fence.beat(110.0, ok=False)
    assert not fence.beat(105.0 + fence.limit - 0.001, ok=False)
    # ... then once, however long the outage lasts.
    assert fence.beat(105.0 + fence.limit, ok=False)
    assert not fence.beat(105.0 + fence.limit + HEARTBEAT, ok=False)
    assert not fence.beat(500.0, ok=False)


def test_a_beat_that_goes_through_ends_the_outage() -> None:
    fence = SelfFence(15.0, now=0.0)
    assert fence.beat(fence.limit, ok=False)
    assert not fence.beat(fence.limit + 1, ok=True)
    assert not fence.beat(fence.limit + 2, ok=False)  # a new outage counts anew
    assert fence.beat(2 * fence.limit + 1, ok=False)


def test_an_outage_from_the_start_counts_from_the_start() -> None:
    fence = SelfFence(15.0, now=50.0)
    assert not fence.beat(50.0, ok=False)
    assert fence.beat(50.0 + fence.limit, ok=False)
