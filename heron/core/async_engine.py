"""AsyncLLMEngine: an LLMEngine driven by a background thread, for asyncio servers.

One dedicated thread owns the `LLMEngine`: it takes new requests and aborts from a
command queue, runs `step()` back to back while there is work and blocks on an
event when there is none (no polling). After each step it hands the step's outputs
to the event loop in one `call_soon_threadsafe`, where each request's
`RequestStream` keeps only the latest (cumulative) output: a slow consumer skips
intermediate states instead of queueing them, and never loses the final one.

If `step()` raises, the engine is considered dead: every open stream and every
queued request fails with `EngineDeadError`, later requests fail at once, and
`is_healthy` turns false. Nothing waits forever.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from heron.config import EngineConfig
from heron.core.engine import LLMEngine, PromptType
from heron.core.outputs import RequestOutput
from heron.core.sampling_params import SamplingParams
from heron.core.spec_decode.stats import SpecDecodingStats
from heron.logger import get_logger

logger = get_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (an error in `step()`, or shutdown)."""


class EngineOverloadedError(RuntimeError):
    """Too many requests wait for a place in the batch; try again later (a server's 503)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, taken by the engine thread after each step."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0          # share of KV blocks held by requests, 0..1
    prefix_cache_queries: int = 0        # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0           # of those, tokens found
    num_preemptions: int = 0
    # Speculative decoding counters (all zero without a speculative_config).
    spec_decoding: SpecDecodingStats = field(default_factory=SpecDecodingStats)


class StatLogger(Protocol):
    """Receives what the engine thread sees; called on the engine thread, must be quick."""

    def log_step(self, outputs: list[RequestOutput]) -> None: ...

    def log_aborted(self, request_ids: list[str]) -> None: ...


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative `RequestOutput`s.

    Iteration ends after the output with `finished=True`; it raises `EngineDeadError`
    if the engine dies. `close()` aborts the request if it has not finished (call it
    in a `finally`, e.g. when the client disconnects).
    """

    def __init__(self, request_id: str, engine: "AsyncLLMEngine") -> None:
        self.request_id = request_id
        self._engine = engine
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self.finished = False      # the final output was delivered to the stream
        self._returned_final = False

    def _put(self, output: RequestOutput) -> None:
        self._latest = output
        self.finished = self.finished or output.finished
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._latest is not None:
                output, self._latest = self._latest, None
                self._returned_final = output.finished
                return output
            if self._returned_final:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()

    def close(self) -> None:
        """Abort the request unless it finished; safe to call more than once."""
        if not self.finished and self._error is None:
            self.finished = True
            self._engine.abort(self.request_id)


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: float
    accepted: concurrent.futures.Future


class AsyncLLMEngine:
    """Runs an `LLMEngine` on its own thread; requests are awaited from an event loop.

    Use from one event loop at a time: `stream = await engine.add_request(...)` then
    `async for output in stream`, or the `generate()` shorthand. `add_request` raises
    the engine's ValueError for bad input before anything is queued.
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine],
                 stat_logger: StatLogger | None = None,
                 max_waiting_requests: int | None = None) -> None:
        """`engine` is an engine or a function that builds one; a function is called on the
        engine thread, so that loading, profiling and every step run on one thread (device
        runtimes keep per-thread state: libgomp, for one, slows both threads' parallel
        regions once two threads use it, here by 40% per decode step)."""
        self.stat_logger = stat_logger
        # Requests accepted but not yet running are held in memory: past this many, new
        # ones are refused (EngineOverloadedError) instead of growing the queue without end.
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be at least 1, got {max_waiting_requests}")
        self.max_waiting_requests = max_waiting_requests
        self.stats = EngineStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}   # touched on the event loop only
        self._lock = threading.Lock()                  # guards the queues and _dead
        self._adds: collections.deque[_Add] = collections.deque()
        self._aborts: list[str] = []
        self._wakeup = threading.Event()
        self._dead: EngineDeadError | None = None
        self._active: set[str] = set()                 # touched on the engine thread only
        build = engine if callable(engine) else (lambda: engine)
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="heron-engine",
                                        daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()   # re-raises what building raised

    @classmethod
    def from_config(cls, config: EngineConfig, stat_logger: StatLogger | None = None,
                    max_waiting_requests: int | None = None) -> "AsyncLLMEngine":
        return cls(lambda: LLMEngine(config), stat_logger, max_waiting_requests)

    # -- the event-loop side ---------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine is dead, or None. Also notices workers that died between steps
        (another process or host), so that a health check turns red without a request."""
        if self._dead is None:
            try:
                self.engine.check_health()
            except Exception as e:  # noqa: BLE001 - whatever it is, the engine cannot step
                self._die(EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))
        return self._dead

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          arrival_time: float | None = None) -> RequestStream:
        """Queue a request and wait until the engine accepted it (ValueError if not)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Outputs go to one loop; moving to another is fine once nothing is in flight.
            if self._streams:
                raise RuntimeError("AsyncLLMEngine is serving requests on another event loop")
            self._loop = loop
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_room()
        stream = RequestStream(request_id, self)
        command = _Add(request_id, prompt, params,
                       arrival_time if arrival_time is not None else time.monotonic(),
                       concurrent.futures.Future())
        with self._lock:
            if self._dead is not None:
                raise self._dead
            self._streams[request_id] = stream
            self._adds.append(command)
        self._wakeup.set()
        try:
            await asyncio.wrap_future(command.accepted)
        except asyncio.CancelledError:
            self.abort(request_id)   # the caller went away while the request was queued
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def _check_room(self) -> None:
        """Refuse a request when `max_waiting_requests` already wait: open requests less
        those in the running batch (as of the engine's last step)."""
        limit = self.max_waiting_requests
        if limit is not None and len(self._streams) - self.stats.num_running >= limit:
            raise EngineOverloadedError(
                f"{limit} requests are already waiting for a place in the batch; retry later")

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative outputs; aborts it if the caller stops early."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request (its KV blocks are freed before the next step)."""
        self._streams.pop(request_id, None)
        with self._lock:
            self._aborts.append(request_id)
        self._wakeup.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream._put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail_streams(self, error: EngineDeadError) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(error)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; open streams and queued requests fail, nothing hangs."""
        self._die(EngineDeadError("the engine was shut down"))
        self._thread.join(timeout)
        self.engine.shutdown()   # worker processes, when the model runs in others

    # -- the engine thread ------------------------------------------------------------

    def _run(self, build: Callable[[], LLMEngine], built: concurrent.futures.Future) -> None:
        try:
            engine = build()
        except BaseException as e:
            built.set_exception(e)
            return
        self.engine = engine
        built.set_result(engine)
        while self._dead is None:
            self._wakeup.clear()   # before draining: a command that arrives later sets it again
            try:
                self._apply_commands()
                if not engine.has_unfinished_requests():
                    self._update_stats()
                    self._wakeup.wait()
                    continue
                outputs = engine.step()
                self._active.difference_update(o.request_id for o in outputs if o.finished)
                self._update_stats()
                if self.stat_logger is not None:
                    self._log(self.stat_logger.log_step, outputs)
            except Exception as e:  # anything here leaves the engine in an unknown state
                logger.exception("engine step failed; failing all requests")
                self._die(EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))
                return
            if outputs:
                self._call_in_loop(self._deliver, outputs)

    def _apply_commands(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, collections.deque()
            aborts, self._aborts = self._aborts, []
        for command in adds:
            # RUNNING from here on, so a late cancel() cannot race with set_result().
            if not command.accepted.set_running_or_notify_cancel():
                continue
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params,
                                        command.arrival_time)
            except Exception as e:   # bad input fails this request only
                command.accepted.set_exception(e)
            else:
                self._active.add(command.request_id)
                command.accepted.set_result(None)
        if aborts:
            known = [r for r in aborts if r in self._active]
            self._active.difference_update(known)
            self.engine.abort_request(aborts)
            if known and self.stat_logger is not None:
                self._log(self.stat_logger.log_aborted, known)

    def _update_stats(self) -> None:
        scheduler = self.engine.scheduler
        kv = scheduler.kv
        self.stats = EngineStats(num_running=scheduler.num_running,
                                 num_waiting=scheduler.num_waiting,
                                 kv_cache_usage=kv.usage(),
                                 prefix_cache_queries=kv.stats.queries,
                                 prefix_cache_hits=kv.stats.hits,
                                 num_preemptions=scheduler.num_preemptions,
                                 spec_decoding=scheduler.spec_stats.copy())

    def _log(self, method: Any, arg: Any) -> None:
        try:
            method(arg)
        except Exception:  # metrics must never take the engine down
            logger.exception("stat logger failed")

    def _die(self, error: EngineDeadError) -> None:
        """Mark the engine dead and fail everything that waits on it (any thread)."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = error
            adds, self._adds = self._adds, collections.deque()
        for command in adds:
            if not command.accepted.done():
                command.accepted.set_exception(error)
        self._wakeup.set()
        self._call_in_loop(self._fail_streams, error)

    def _call_in_loop(self, callback: Any, arg: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # that loop is closed: nobody is waiting there any more
            pass
