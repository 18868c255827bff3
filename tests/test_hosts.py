"""hosts.leader_first: process 0 first, the others after it; a failure on process 0 stops all."""

import numpy as np
import pytest
from jax.experimental import multihost_utils

from xwin_jax import hosts


class FakeHosts:
    """Process `index` of `count`, with a broadcast that hands back what process 0 sent."""

    def __init__(self, monkeypatch, index, count=2, leader_sends=None):
        self.broadcasts = []
        monkeypatch.setattr(hosts.jax, "process_count", lambda: count)
        monkeypatch.setattr(hosts.jax, "process_index", lambda: index)

        def broadcast(value):
            self.broadcasts.append(int(value))
            return np.int32(leader_sends if leader_sends is not None else value)
        monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)


def test_process_zero_runs_before_the_barrier_the_others_after(monkeypatch):
    calls = []
    leader = FakeHosts(monkeypatch, index=0)
    assert hosts.leader_first("step", lambda: calls.append("ran") or 7) == 7
    assert calls == ["ran"] and leader.broadcasts == [1]

    calls.clear()
    follower = FakeHosts(monkeypatch, index=1, leader_sends=1)
    assert hosts.leader_first("step", lambda: calls.append(len(follower.broadcasts)) or 8) == 8
    assert calls == [1]  # ran after the broadcast


def test_a_failure_on_process_zero_stops_every_host_with_a_message(monkeypatch):
    leader = FakeHosts(monkeypatch, index=0)
    with pytest.raises(OSError, match="disk full"):
        hosts.leader_first("prepare tfds /data",
                           lambda: (_ for _ in ()).throw(OSError("disk full")))
    assert leader.broadcasts == [0]  # the others were told before it raised

    FakeHosts(monkeypatch, index=1, leader_sends=0)
    ran = []
    with pytest.raises(hosts.LeaderFailed, match="prepare tfds /data: failed on process 0"):
        hosts.leader_first("prepare tfds /data", lambda: ran.append(1))
    assert not ran
