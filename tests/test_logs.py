"""Throttled logging: a peer that causes the same error at will cannot grow the log without bound."""

from tessera.logs import Throttled


class Recorder:
    def __init__(self):
        self.lines = []

    def warning(self, event, **fields):
        self.lines.append((event, fields))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_repeats_within_the_window_are_counted_not_written():
    rec, clock = Recorder(), Clock()
    t = Throttled(rec, window=60, clock=clock)
    assert t.log("handshake", "bad handshake", peer="a")
    for _ in range(1000):
        assert not t.log("handshake", "bad handshake", peer="a")
    assert len(rec.lines) == 1
    clock.now = 61
    assert t.log("handshake", "bad handshake", peer="a")
    assert rec.lines[-1] == ("bad handshake", {"peer": "a", "suppressed": 1000})


def test_distinct_keys_are_throttled_apart_and_the_table_is_bounded():
    rec, clock = Recorder(), Clock()
    t = Throttled(rec, window=60, max_keys=8, clock=clock)
    for i in range(100):
        t.log(f"k{i}", "e")
    assert len(rec.lines) == 100
    assert len(t._state) == 8
