"""Batching across requests: the sentences of requests that arrive close together, for the same model
and search settings, are decoded in one batched search.

One worker takes the first waiting request, then gathers others with the same settings for up to
`max_wait_ms`, until `max_batch_tokens` source tokens; decodes them all in one call, off the event
loop (so `/health` answers meanwhile); and hands each request back exactly its own sentences, in
order. A request whose caller has gone (its future cancelled) is left out of the batch. The queue is
bounded: `submit` raises `QueueFull` when it is full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass


class QueueFull(Exception):
    """The server has `max_queue` requests waiting already."""


@dataclass
class _Job:
    key: Hashable  # the model and search settings: only jobs with the same key share a batch
    sentences: list[str]
    tokens: int
    future: asyncio.Future


class Batcher:
    """`await batcher.submit(key, sentences)` -> what `decode(key, sentences)` returns for them.

    decode(key, sentences) -> one result per sentence, run in a worker thread; measure(key, sentence)
    -> its source tokens; on_batch(n_sentences, n_requests) is called for each batch decoded."""

    def __init__(
        self,
        decode: Callable[[Hashable, list[str]], list],
        measure: Callable[[Hashable, str], int],
        max_wait_ms: float = 10.0,
        max_batch_tokens: int = 4096,
        max_queue: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
    ):
        self.decode, self.measure = decode, measure
        self.max_wait = max_wait_ms / 1000
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._waiting: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.busy = False

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish the requests waiting and in flight, then stop."""
        while self._waiting or self.busy:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def submit(self, key: Hashable, sentences: Sequence[str]) -> list:
        if len(self._waiting) >= self.max_queue:
            raise QueueFull
        sentences = list(sentences)
        tokens = sum(self.measure(key, sentence) for sentence in sentences)
        job = _Job(key, sentences, tokens, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self._arrived.set()
        return await job.future

    async def _run(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            self.busy = True
            try:
                await self._decode(batch)
            finally:
                self.busy = False

    async def _gather(self) -> list[_Job]:
        """The first waiting job, and those with its key that come within max_wait, up to
        max_batch_tokens (the first job alone may exceed it)."""
        first = self._waiting.popleft()
        batch, tokens = [first], first.tokens
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while True:
            for job in list(self._waiting):
                if job.key == first.key and tokens + job.tokens <= self.max_batch_tokens:
                    self._waiting.remove(job)
                    batch.append(job)
                    tokens += job.tokens
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or tokens >= self.max_batch_tokens:
                return batch
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _decode(self, batch: list[_Job]) -> None:
        live = [job for job in batch if not job.future.done()]  # a caller that went is cancelled
        if not live:
            return
        sentences = [sentence for job in live for sentence in job.sentences]
        if self.on_batch is not None:
            self.on_batch(len(sentences), len(live))
        try:
            results = await asyncio.to_thread(self.decode, live[0].key, sentences)
        except Exception as error:  # each request gets the error; the server goes on
            for job in live:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        start = 0
        for job in live:
            end = start + len(job.sentences)
            if not job.future.done():
                job.future.set_result(results[start:end])
            start = end
