"""Keep the accelerator busy: decode ahead and write behind on background threads.

    for batch in prefetched(chunks(items, 64), decode):   # decode of batch k+1 overlaps compute of k
        out = compute(batch)
        writer.submit(encode_and_write, out)                # encoding/tar writing overlaps compute of k+1

Both use one worker thread each, so order is preserved and a tar is written
by exactly one thread. PNG/zlib and tar I/O release the GIL, so the threads
overlap for real. Exceptions surface in the caller, at the latest on close.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def prefetched(items: Iterable[T], fn: Callable[[T], R], depth: int = 2) -> Iterator[R]:
    """fn(item) for each item, computed up to `depth` items ahead on a background thread.

    The input iterator is advanced on that thread too (reading a tar is I/O).
    """
    it = iter(items)
    sentinel = object()

    def step():
        item = next(it, sentinel)
        return sentinel if item is sentinel else fn(item)

    with ThreadPoolExecutor(1, thread_name_prefix="cfgen-prefetch") as pool:
        pending: deque[Future] = deque(pool.submit(step) for _ in range(depth))
        while pending:
            result = pending.popleft().result()
            if result is sentinel:
                break
            pending.append(pool.submit(step))
            yield result
        for f in pending:
            f.cancel()


class BackgroundWriter:
    """Run jobs in submission order on one thread; re-raise the first failure."""

    def __init__(self, max_pending: int = 4):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cfgen-writer")
        self._pending: deque[Future] = deque()
        self._max = max_pending

    def submit(self, fn: Callable, *args) -> None:
        # Bounded: never hold more than a few batches of results in memory.
        while len(self._pending) >= self._max:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: drain quietly, keep the original error
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
