"""Compute the next items of a pipeline in background threads while the caller works on the current one.

`eval` uses it to decode and preprocess the next batches of images while the runtime runs the current
one: Pillow's decoder and resampler and the runtimes' ``invoke``/``execute`` release the GIL, so a
decode thread overlaps with inference instead of adding to it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")


def prefetched(items: Iterable[A], fn: Callable[[A], B], ahead: int = 2, workers: int = 1) -> Iterator[B]:
    """``fn(item)`` for each item, in order, computed by ``workers`` threads at most ``ahead`` items early.

    ``ahead`` bounds the memory held (finished and running results); an exception raised by ``fn`` is
    raised here, at that item's position, as a sequential ``map`` would. ``workers < 1`` is a plain
    ``map`` in the calling thread. Close the generator (``contextlib.closing``) when stopping early:
    the work not started is cancelled and running work is waited for, so no thread outlives it.
    """
    if workers < 1:
        yield from map(fn, items)
        return
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge-convnext-prefetch") as pool:
        pending: deque[Future[B]] = deque()
        try:
            for item in source:
                pending.append(pool.submit(fn, item))
                if len(pending) >= max(1, ahead):
                    break
            while pending:
                result = pending.popleft().result()
                for item in source:  # refill: one submitted for each one taken
                    pending.append(pool.submit(fn, item))
                    break
                yield result
        finally:
            for f in pending:
                f.cancel()
