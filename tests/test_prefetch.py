"""`edge_convnext.prefetch.prefetched`: the background decoding `eval` overlaps with inference."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from edge_convnext.prefetch import prefetched


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_in_order_and_never_more_than_ahead_items_early(workers):
    lock = threading.Lock()
    started: list[int] = []
    taken: list[int] = []

    def slow(i: int) -> int:
        with lock:
            started.append(i)
            if workers:  # never more than `ahead` items past the one being handed over (not yet in `taken`)
                assert i <= len(taken) + 3, (i, taken)
        time.sleep(0.001 * (7 - i % 7))  # later items often finish first with several workers
        return i * i

    for v in prefetched(range(20), slow, ahead=3, workers=workers):
        taken.append(v)
    assert taken == [i * i for i in range(20)] and sorted(started) == list(range(20))


def test_an_error_is_raised_at_its_position_and_stopping_early_cancels_the_rest():
    calls: list[int] = []

    def fn(i: int) -> int:
        calls.append(i)
        if i == 5:
            raise ValueError("item 5")
        return i

    got = []
    with pytest.raises(ValueError, match="item 5"):
        for v in prefetched(range(100), fn, ahead=2, workers=1):
            got.append(v)
    assert got == [0, 1, 2, 3, 4] and max(calls) <= 7  # nothing far past the failure was started

    calls.clear()
    with contextlib.closing(prefetched(range(100), fn, ahead=2, workers=1)) as it:
        assert next(it) == 0
    assert max(calls) <= 2 and threading.active_count() < 10  # closed: pending work cancelled, threads joined
    assert not any(t.name.startswith("edge-convnext-prefetch") for t in threading.enumerate())
