"""qkv.serve.batcher on its own, with a fake decoder: who shares a batch, who is left out."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from qkv.serve.batcher import Batcher, QueueFull


def recording_batcher(max_wait_ms=50.0, max_batch_tokens=1000, max_queue=100, delay=0.0):
    calls: list[tuple] = []

    def decode(key, sentences):
        calls.append((key, list(sentences)))
        time.sleep(delay)
        return [f"{key}:{sentence}" for sentence in sentences]

    batcher = Batcher(decode, lambda key, sentence: len(sentence.split()), max_wait_ms,
                      max_batch_tokens, max_queue)  # fmt: skip
    return batcher, calls


def test_requests_with_the_same_key_share_a_batch_and_get_their_own_results():
    async def run():
        batcher, calls = recording_batcher()
        batcher.start()
        results = await asyncio.gather(
            batcher.submit("a", ["one", "two"]),
            batcher.submit("b", ["three"]),
            batcher.submit("a", ["four"]),
        )
        await batcher.stop()
        return results, calls

    results, calls = asyncio.run(run())
    assert results == [["a:one", "a:two"], ["b:three"], ["a:four"]]
    assert calls == [("a", ["one", "two", "four"]), ("b", ["three"])]


def test_a_batch_stops_at_max_batch_tokens():
    async def run():
        batcher, calls = recording_batcher(max_batch_tokens=4)
        batcher.start()
        await asyncio.gather(*(batcher.submit("k", ["w w"]) for _ in range(4)))
        await batcher.stop()
        return calls

    calls = asyncio.run(run())
    assert [len(sentences) for _, sentences in calls] == [2, 2]


def test_a_caller_that_has_gone_is_left_out_of_the_next_batch():
    async def run():
        batcher, calls = recording_batcher(max_wait_ms=0, delay=0.2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("k", ["busy"]))
        await asyncio.sleep(0.05)  # the worker is decoding "busy" now
        gone = asyncio.ensure_future(batcher.submit("k", ["gone"]))
        stays = asyncio.ensure_future(batcher.submit("k", ["stays"]))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected while it waited
        await asyncio.gather(first, stays)
        await batcher.stop()
        return calls, stays.result()

    calls, stays = asyncio.run(run())
    assert stays == ["k:stays"]
    assert all("gone" not in sentences for _, sentences in calls)


def test_the_event_loop_stays_free_while_a_batch_decodes():
    async def run():
        batcher, _ = recording_batcher(max_wait_ms=0, delay=0.3)
        batcher.start()
        request = asyncio.ensure_future(batcher.submit("k", ["slow"]))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await asyncio.sleep(0.01)  # what /health does: it needs the loop, not the model
        waited = time.perf_counter() - started
        assert not request.done() and threading.active_count() >= 2
        await request
        await batcher.stop()
        return waited

    assert asyncio.run(run()) < 0.1


def test_a_full_queue_refuses_at_once():
    async def run():
        batcher, _ = recording_batcher(max_queue=0)
        batcher.start()
        with pytest.raises(QueueFull):
            await batcher.submit("k", ["x"])
        await batcher.stop()

    asyncio.run(run())
