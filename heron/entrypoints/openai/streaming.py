"""Turning cumulative engine outputs into deltas, server-sent events, and merged streams."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request

from heron.core.async_engine import RequestStream
from heron.core.outputs import CompletionOutput, RequestOutput

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def held_back_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string.

    The engine cuts a stop string out of the text once it is complete; until then its
    first characters must not be streamed, or the client would see text that the
    final answer does not contain.
    """
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclass
class Delta:
    """What one choice gained since the last chunk."""
    text: str
    token_start: int          # index of the first new token in the choice's token_ids
    token_end: int
    finish_reason: str | None
    stop_reason: int | str | None


class ChoiceTracker:
    """Remembers how much of one choice has been sent and yields the next safe delta."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.sent_chars = 0
        self.sent_tokens = 0
        self.done = False
        self.prefix_sent = False   # the echoed prompt / the chat role went out

    def advance(self, output: CompletionOutput) -> Delta | None:
        """The next delta, or None when there is nothing new to send."""
        if self.done:
            return None
        text = output.text
        finished = output.finish_reason is not None
        safe = len(text) if finished else len(text) - held_back_length(text, self.stops)
        num_tokens = len(output.token_ids)
        if safe <= self.sent_chars and num_tokens == self.sent_tokens and not finished:
            return None
        delta = Delta(text[self.sent_chars:safe] if safe > self.sent_chars else "",
                      self.sent_tokens, num_tokens, output.finish_reason, output.stop_reason)
        self.sent_chars = max(self.sent_chars, safe)
        self.sent_tokens = num_tokens
        self.done = finished
        return delta


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as (index of the stream, output), in arrival order."""
    if len(streams) == 1:   # the common case needs no tasks
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output, None))
        except Exception as e:
            queue.put_nowait((index, None, e))
            return
        queue.put_nowait((index, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        for task in tasks:
            task.cancel()


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    """The last output of each stream (all finished), in stream order."""
    last: list[RequestOutput | None] = [None] * len(streams)
    async for index, output in merge_streams(streams):
        last[index] = output
    return [o for o in last if o is not None]


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next message is the disconnect (or the end of
    # the response, which means we are done anyway).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(awaitable: Awaitable[T], request: Request) -> T:
    """Await `awaitable`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise ClientDisconnected()
