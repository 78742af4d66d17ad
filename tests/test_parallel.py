"""Threads that overlap I/O with compute: order, errors and early exits."""
from __future__ import annotations

import threading
import time

import pytest

from segpipe.parallel import WriteBehind, background


def test_background_yields_every_item_in_order_from_another_thread():
    threads = []

    def items():
        for i in range(20):
            threads.append(threading.current_thread())
            yield i

    assert list(background(items(), depth=3)) == list(range(20))
    assert threading.current_thread() not in threads


def test_background_stays_at_most_depth_items_ahead():
    produced = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    it = background(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)
    # one handed out, `depth` queued, and one more made while waiting to be queued
    assert len(produced) <= 1 + 2 + 1
    it.close()


def test_background_raises_the_producers_error_in_the_consumer():
    def items():
        yield 1
        raise ValueError("bad tile")

    it = background(items())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad tile"):
        next(it)


def test_leaving_early_stops_the_producer():
    def items():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    for i in background(items()):
        if i == 3:
            break
    time.sleep(0.1)
    assert threading.active_count() == before


def test_write_behind_runs_every_write_in_order_and_raises_its_error():
    written = []
    with WriteBehind() as writer:
        for i in range(5):
            writer.submit(written.append, i)
    assert written == list(range(5))

    with pytest.raises(OSError, match="disk full"), WriteBehind() as writer:
        writer.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
