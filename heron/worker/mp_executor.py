"""The multiprocess executor: one spawned process per rank on this host.

Each step is encoded once (`StepEncoder`: new requests whole, running ones as the
tokens the workers lack), pickled once, and the same bytes are written to every
rank's pipe; rank 0 answers with the sampled tokens, the others with an empty reply
once their share is done. A step is a few kilobytes even at 64 running requests,
written in tens of microseconds (measured: README, Tensor parallelism).

Faults: the engine waits on every rank's pipe *and* its process sentinel, so a dead
rank is noticed at once; a rank that raises sends its error back; a rank that does
not answer within HERON_WORKER_TIMEOUT_SECONDS is declared failed (collectives time
out after as long, so a rank waiting on a dead peer does not hang either). After any
of these every rank is killed and each later call raises the same `WorkerError`.
Workers exit by themselves when the engine's process goes away (their pipe closes, and
a watchdog notices the parent is gone), so no process outlives the engine.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any

from heron.config import EngineConfig
from heron.core.scheduler import ModelRunnerOutput
from heron.logger import get_logger
from heron.platforms.interface import Platform, RankPlacement
from heron.worker.executor import WorkerError
from heron.worker.remote_executor import RemoteRanksExecutor
from heron.worker.worker import REMOTE_METHODS, WorkerSpec

logger = get_logger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class _Rank:
    """The engine's view of one worker process."""
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection

    def died(self) -> WorkerError:
        self.process.join(1.0)
        code = self.process.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        return WorkerError(self.rank, f"process {self.process.pid} died ({how})")


class MultiprocExecutor(RemoteRanksExecutor):
    """`tensor_parallel_size` ranks, each in a process of its own on this host."""

    def __init__(self, config: EngineConfig, platform: Platform, model_path: str) -> None:
        super().__init__(config, platform, model_path)
        world = self.config.parallel.world_size
        context = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self._ranks: list[_Rank] = []
        for rank in range(world):
            spec = WorkerSpec(self.config, platform, model_path,
                              RankPlacement(rank, world, rank, world), init_method, self._timeout)
            ours, theirs = context.Pipe()
            process = context.Process(target=run_worker_process, name=f"heron-worker-{rank}",
                                      args=(spec, theirs, os.getpid()), daemon=True)
            process.start()
            theirs.close()
            self._ranks.append(_Rank(rank, process, ours))
        # Whatever happens to this object (error, garbage collection, interpreter exit),
        # the processes go with it.
        self._finalizer = weakref.finalize(self, _kill, [r.process for r in self._ranks])
        facts = self._replies(timeout=None)     # each rank's "loaded" message
        self._facts = facts[0]
        logger.info("%d worker processes ready (tensor parallel, %s)", world,
                    platform.distributed_backend)

    def check_health(self) -> None:
        if self._error is None:
            for r in self._ranks:
                if r.process.exitcode is not None:
                    self._fail(r.died())
        self._raise_if_failed()

    def shutdown(self) -> None:
        if self._error is None and all(r.process.is_alive() for r in self._ranks):
            try:
                self._call("shutdown", timeout=10.0)
            except WorkerError as e:
                logger.warning("worker shutdown: %s", e)
        self._error = self._error or WorkerError(None, "the executor was shut down")
        for r in self._ranks:
            r.process.join(5.0)
        self._finalizer()
        for r in self._ranks:
            r.conn.close()

    # -- talking to the ranks ---------------------------------------------------------

    def _call(self, method: str, *args: Any, timeout: float | None = -1.0) -> list[Any]:
        self._raise_if_failed()
        self._send(pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL))
        return self._replies(self._timeout if timeout == -1.0 else timeout)

    def _run_step(self, payload: bytes, since: float) -> ModelRunnerOutput:
        # The step's bytes go inside the call as they are (pickling bytes is a copy).
        message = pickle.dumps(("execute_pickled_step", (payload,)),
                               protocol=pickle.HIGHEST_PROTOCOL)
        self._send(message)
        self.transfer.record(len(message), since)
        return self._replies(self._timeout)[0]

    def _send(self, message: bytes) -> None:
        """The same bytes to every rank's pipe."""
        for r in self._ranks:
            try:
                r.conn.send_bytes(message)
            except (BrokenPipeError, ConnectionError, OSError):
                self._fail(r.died())

    def _replies(self, timeout: float | None) -> list[Any]:
        """One reply from every rank, watching their processes meanwhile."""
        results: list[Any] = [None] * len(self._ranks)
        waiting = {r.conn: r for r in self._ranks}
        sentinels = {r.process.sentinel: r for r in self._ranks}
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(
                list(waiting) + [s for s, r in sentinels.items() if r.conn in waiting], left)
            if not ready:
                ranks = ", ".join(str(r.rank) for r in waiting.values())
                self._fail(WorkerError(min(r.rank for r in waiting.values()),
                                       f"no answer within {timeout:.0f} s (ranks {ranks}); "
                                       "HERON_WORKER_TIMEOUT_SECONDS sets the limit"))
            for obj in ready:
                r = waiting.get(obj) or sentinels[obj]   # type: ignore[index, call-overload]
                if r.conn not in waiting:
                    continue
                if obj is not r.conn and not r.conn.poll():
                    self._fail(r.died())
                try:
                    status, value = r.conn.recv()
                except (EOFError, OSError):
                    self._fail(r.died())
                del waiting[r.conn]
                if status == "error":
                    self._fail(WorkerError(r.rank, value))
                results[r.rank] = value
        return results


def _kill(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(5.0)


# -- the worker process -------------------------------------------------------------------

def run_worker_process(spec: WorkerSpec, conn: multiprocessing.connection.Connection,
                       parent_pid: int) -> None:
    """A rank's process: build the worker, then answer calls until told to stop or until
    the engine's process is gone."""
    _exit_when_parent_dies(parent_pid)
    rank = spec.placement.rank
    try:
        worker = spec.build()
        conn.send(("ok", worker.model_facts()))
    except BaseException as e:  # noqa: BLE001 - reported to the engine, which stops
        _send_error(conn, e)
        return
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break   # the engine went away
        if method not in REMOTE_METHODS:
            conn.send(("error", f"unknown worker method {method!r}"))
            continue
        try:
            result = getattr(worker, method)(*args)
        except Exception as e:  # noqa: BLE001
            logger.exception("rank %d: %s failed", rank, method)
            _send_error(conn, e)
            continue
        conn.send(("ok", result))
        if method == "shutdown":
            break


def _send_error(conn: multiprocessing.connection.Connection, error: BaseException) -> None:
    detail = "".join(traceback.format_exception_only(type(error), error)).strip()
    try:
        conn.send(("error", detail))
    except (BrokenPipeError, OSError):
        pass


def _exit_when_parent_dies(parent_pid: int) -> None:
    """Exit if the engine's process disappears, even while this one waits in a collective."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)
    threading.Thread(target=watch, name="heron-parent-watch", daemon=True).start()
