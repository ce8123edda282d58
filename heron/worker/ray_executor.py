"""The Ray executor: one Ray actor per rank, on one host or spread over a Ray cluster.

Connecting: if this process is already connected to Ray (`ray.init` was called), heron
uses that connection as it is. Otherwise it calls `ray.init()` with no address, which
in Ray 2.x joins the cluster named by RAY_ADDRESS if set (``host:port``, or
``ray://host:10001`` for Ray Client), else the cluster last started on this host with
``ray start --head``, else starts a private one-node Ray instance (without the
dashboard: start Ray yourself, with `ray start --head` or `ray.init()`, to have one).
heron never calls `ray.shutdown()`: a cluster the user connected is theirs, and even
an instance heron started may be shared by later engines in this process; Ray
disconnects (and stops an instance it started) by itself when the interpreter exits.

Placement: a placement group with one bundle per rank ({"CPU": 1}, plus {"GPU": 1} on
CUDA platforms), strategy PACK: the ranks share a node when one has room and spread
over several when none has. Every actor gets the driver's HERON_* variables (Ray
actors do not inherit the driver's environment). Rank 0 reports its node's address and
a free port there, the process-group rendezvous; ranks on the same node are numbered
in rank order for `local_rank` (which GPU, how many cores). heron must be installed,
at the same version, on every node the ranks run on.

Steps: each step is encoded and pickled once (`StepEncoder`), and every actor receives
the same bytes: inside the call for a usual step of a few kilobytes, through the object
store (once) for a large one; rank 0 answers with the sampled tokens.

Faults follow the multiprocess executor: an actor that dies, a rank that raises, or a
rank that does not answer within HERON_WORKER_TIMEOUT_SECONDS fails the executor;
every actor is then killed and this and every later call raise the same `WorkerError`
naming the rank. Each actor also runs a `watch` call that never returns (in a
concurrency group of its own), so `check_health()` notices a dead actor between steps
without blocking. The actors and the placement group are owned by this process: Ray
removes them if it exits, and a finalizer kills them when the executor goes away.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING, Any

from heron.config import EngineConfig
from heron.core.scheduler import ModelRunnerOutput
from heron.logger import get_logger
from heron.platforms.interface import Platform, RankPlacement
from heron.worker.executor import WorkerError
from heron.worker.mp_executor import free_port
from heron.worker.remote_executor import RemoteRanksExecutor
from heron.worker.worker import REMOTE_METHODS, ModelFacts, Worker, WorkerSpec

if TYPE_CHECKING:  # Ray is optional: imported when an executor is built
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

logger = get_logger(__name__)

# The concurrency group of `RankActor.watch`, so that it never blocks the rank's calls.
_WATCH_GROUP = "heron-watch"
# After a rank raises, how long to wait for the others before choosing which error to
# report: a dead peer makes the survivors' collectives fail too, and the death is the cause.
_CAUSE_GRACE_S = 2.0
# Steps pickled to at most this many bytes are sent inside the calls; larger ones through
# the object store (Ray itself stores arguments over 100 KiB there, once per call).
_INLINE_STEP_BYTES = 64 * 1024
# How long `shutdown()` lets the ranks leave their process group before killing them.
_SHUTDOWN_TIMEOUT_S = 10.0
# How often to report while waiting for the cluster to make room for the ranks.
_PLACEMENT_LOG_EVERY_S = 10.0


def _import_ray() -> Any:
    """The `ray` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("distributed_executor_backend='ray' needs Ray: "
                          "pip install 'heron[ray]'") from e
    return ray


def _connect(ray: Any) -> bool:
    """Connect this process to Ray (see the module docstring); True if this call did."""
    if ray.is_initialized():
        return False
    # No address: Ray reads RAY_ADDRESS, then looks for a `ray start` cluster on this
    # host, and starts a local instance only if it finds neither. Such a private
    # instance goes without the dashboard (seconds of start-up, and a port opened that
    # nobody asked for); the other arguments only apply to an instance Ray starts.
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    return True


class RankActor:
    """One rank in a Ray actor (made remote by `RayExecutor`, so that importing this
    module does not need Ray)."""

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def node(self) -> tuple[str, str, list[str]]:
        """This actor's node id, node address, and the GPU ids Ray gave it."""
        import ray
        context = ray.get_runtime_context()
        gpus = [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
        return context.get_node_id(), ray.util.get_node_ip_address(), gpus

    def free_port(self, host: str) -> int:
        return free_port(host)

    def build(self, spec: WorkerSpec, node_gpus: list[str]) -> ModelFacts:
        """Load this rank's shard (all ranks at once: they meet in the process group)."""
        if node_gpus:
            _see_node_gpus(node_gpus)
        self.worker = spec.build()
        return self.worker.model_facts()

    def call(self, method: str, *args: Any) -> Any:
        """`method(*args)` of this rank's worker (a method named in REMOTE_METHODS)."""
        if method not in REMOTE_METHODS:
            raise ValueError(f"unknown worker method {method!r}")
        assert self.worker is not None, "call before build"
        try:
            return getattr(self.worker, method)(*args)
        except Exception:
            # The engine gets the one-line cause; the traceback goes to the rank's log
            # (which Ray forwards to the driver's terminal).
            logger.exception("rank %d: %s failed", self.worker.rank, method)
            raise


    def watch(self) -> None:
        """Never returns: its reference fails when the actor dies."""
        threading.Event().wait()


def _see_node_gpus(node_gpus: list[str]) -> None:
    """Ray shows each actor only its own GPU; the platform selects device `local_rank`,
    so let every rank on the node see the node's ranks' GPUs, in local-rank order."""
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if var in os.environ:
            os.environ[var] = ",".join(node_gpus)


class RayExecutor(RemoteRanksExecutor):
    """`tensor_parallel_size` ranks, each in a Ray actor, on the nodes of a Ray cluster."""

    def __init__(self, config: EngineConfig, platform: Platform, model_path: str) -> None:
        super().__init__(config, platform, model_path)
        self._ray = ray = _import_ray()
        self.connected_ray = _connect(ray)   # True: this executor called ray.init
        world = self.config.parallel.world_size
        self._actors: list[ActorHandle] = []
        self._pg = self._place(world)
        # Whatever happens to this object (error, garbage collection, interpreter exit),
        # the actors and their reservation go with it; the list fills in below.
        self._finalizer = weakref.finalize(self, _release, ray, self._actors, self._pg)
        self._actors.extend(self._start_actors(world))
        self._watches = [a.watch.options(concurrency_group=_WATCH_GROUP).remote()
                         for a in self._actors]
        self._facts = self._build(world, model_path)[0]
        logger.info("%d Ray actors ready (tensor parallel, %s)", world,
                    platform.distributed_backend)

    def check_health(self) -> None:
        if self._error is None and self._watches:
            # Local and non-blocking: a watch finishes only when its actor died.
            ended, _ = self._ray.wait(self._watches, num_returns=len(self._watches),
                                      timeout=0, fetch_local=False)
            if ended:
                rank = min(self._watches.index(ref) for ref in ended)
                self._fail(self._outcome(rank, self._watches[rank])[1] or
                           WorkerError(rank, "Ray actor stopped"))
        self._raise_if_failed()

    def shutdown(self) -> None:
        if self._error is None:
            try:
                self._call("shutdown", timeout=_SHUTDOWN_TIMEOUT_S)
            except WorkerError as e:
                logger.warning("worker shutdown: %s", e)
        self._error = self._error or WorkerError(None, "the executor was shut down")
        self._finalizer()

    # -- starting the ranks -----------------------------------------------------------

    def _bundle(self) -> dict[str, float]:
        """What one rank reserves: a CPU, and a GPU where the model runs on CUDA."""
        if self.platform.device_type == "cuda":
            return {"GPU": 1.0, "CPU": 1.0}
        return {"CPU": 1.0}

    def _place(self, world: int) -> "PlacementGroup":
        """Reserve a bundle per rank, waiting up to the worker timeout for room."""
        from ray.util.placement_group import placement_group, remove_placement_group

        pg = placement_group([self._bundle()] * world, strategy="PACK")
        deadline = time.monotonic() + self._timeout
        while not pg.wait(max(0.0, min(_PLACEMENT_LOG_EVERY_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                remove_placement_group(pg)
                raise RuntimeError(self._lacking(world) + f" (waited {self._timeout:.0f} s; "
                                   "HERON_WORKER_TIMEOUT_SECONDS sets the limit)")
            logger.warning("waiting for the Ray cluster to make room: %s", self._lacking(world))
        return pg

    def _lacking(self, world: int) -> str:
        """What the cluster has free, against what the ranks need, in words."""
        free = self._ray.available_resources()
        total = self._ray.cluster_resources()
        have = ", ".join(f"{free.get(k, 0):g} {k}s free (of {total.get(k, 0):g})"
                         for k in self._bundle())
        need = " and ".join(f"{v * world:g} {k}s" for k, v in self._bundle().items())
        return (f"the Ray cluster has {have}; tensor_parallel_size={world} needs {need} "
                "(one of each per rank)")

    def _start_actors(self, world: int) -> list["ActorHandle"]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = self._ray.remote(concurrency_groups={_WATCH_GROUP: 1})(RankActor)
        bundle = self._bundle()
        env = {k: v for k, v in os.environ.items() if k.startswith("HERON_")}
        return [remote.options(
                    num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                    max_restarts=0, max_concurrency=1,   # a rank's calls run in order
                    runtime_env={"env_vars": env},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._pg, placement_group_bundle_index=rank),
                ).remote()
                for rank in range(world)]

    def _build(self, world: int, model_path: str) -> list[ModelFacts]:
        """Find where each rank landed, then build every rank's worker at once."""
        nodes = self._gather([a.node.remote() for a in self._actors], self._timeout)
        ip = nodes[0][1]
        port = self._gather([self._actors[0].free_port.remote(ip)], self._timeout)[0]
        init_method = f"tcp://{ip}:{port}"
        refs = []
        for rank, actor in enumerate(self._actors):
            peers = [r for r in range(world) if nodes[r][0] == nodes[rank][0]]
            placement = RankPlacement(rank, world, peers.index(rank), len(peers))
            spec = WorkerSpec(self.config, self.platform, model_path, placement, init_method,
                              self._timeout)
            node_gpus = [g for r in peers for g in nodes[r][2]]
            refs.append(actor.build.remote(spec, node_gpus))
        hosts = len({n[0] for n in nodes})
        logger.info("%d ranks on %d Ray node(s), rendezvous %s", world, hosts, init_method)
        return self._gather(refs, None)   # loading may take long; failures end it early

    # -- talking to the ranks ---------------------------------------------------------

    def _call(self, method: str, *args: Any, timeout: float | None = -1.0) -> list[Any]:
        self._raise_if_failed()
        refs = [a.call.remote(method, *args) for a in self._actors]
        return self._gather(refs, self._timeout if timeout == -1.0 else timeout)

    def _run_step(self, payload: bytes, since: float) -> ModelRunnerOutput:
        # A usual step (a few kilobytes) travels inside the calls themselves: 3-4 ms a
        # step faster than the object store (measured: two ranks, one host). A large one
        # (long new prompts) goes into the object store once, where Ray would otherwise
        # copy it once per rank.
        step = payload if len(payload) <= _INLINE_STEP_BYTES else self._ray.put(payload)
        refs = [a.call.remote("execute_pickled_step", step) for a in self._actors]
        self.transfer.record(len(payload), since)
        return self._gather(refs, self._timeout)[0]

    def _gather(self, refs: list[Any], timeout: float | None) -> list[Any]:
        """The values of `refs` (one per rank, in rank order), failing the executor on the
        first rank that died, raised, or did not answer in time."""
        results: list[Any] = [None] * len(refs)
        pending = {ref: rank for rank, ref in enumerate(refs)}
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # One at a time, so that a failure is noticed (and named) as soon as it happens.
            ready, _ = self._ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                ranks = ", ".join(str(r) for r in sorted(pending.values()))
                self._fail(WorkerError(min(pending.values()),
                                       f"no answer within {timeout:.0f} s (ranks {ranks}); "
                                       "HERON_WORKER_TIMEOUT_SECONDS sets the limit"))
            rank = pending.pop(ready[0])
            value, error = self._outcome(rank, ready[0])
            if error is not None:
                self._fail(self._root_cause(error, pending))
            results[rank] = value
        return results

    def _outcome(self, rank: int, ref: Any) -> tuple[Any, WorkerError | None]:
        """A finished reference's value, or the `WorkerError` it holds instead."""
        ray = self._ray
        try:
            return ray.get(ref, timeout=0), None
        except ray.exceptions.RayActorError as e:   # ActorDiedError, ActorUnavailableError
            return None, _ActorDied(rank, f"Ray actor died: {_one_line(e)}")
        except ray.exceptions.RayTaskError as e:    # the rank raised: report what it raised
            cause = e.cause if isinstance(e.cause, BaseException) else e
            detail = "".join(traceback.format_exception_only(type(cause), cause)).strip()
            return None, WorkerError(rank, detail)
        except ray.exceptions.RayError as e:        # e.g. its runtime env could not be set up
            return None, WorkerError(rank, f"{type(e).__name__}: {_one_line(e)}")

    def _root_cause(self, first: WorkerError, pending: dict[Any, int]) -> WorkerError:
        """`first`, unless another rank died meanwhile: a dead rank's peers fail in their
        collectives, and the death, not their error, is what happened."""
        if not pending or isinstance(first, _ActorDied):
            return first
        ready, _ = self._ray.wait(list(pending), num_returns=len(pending),
                                  timeout=_CAUSE_GRACE_S)
        for ref in sorted(ready, key=pending.__getitem__):
            _, error = self._outcome(pending[ref], ref)
            if isinstance(error, _ActorDied):
                return error
        return first


class _ActorDied(WorkerError):
    """A rank's actor is gone (as opposed to a rank that raised)."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _release(ray: Any, actors: list["ActorHandle"], pg: "PlacementGroup") -> None:
    """Kill the actors and free their reservation (nothing to do once Ray is gone: the
    actors died with this process's connection)."""
    if not ray.is_initialized():
        return
    from ray.util.placement_group import remove_placement_group
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # noqa: BLE001 - already dead, or Ray is going away
            logger.debug("ray.kill: %s", e)
    try:
        remove_placement_group(pg)
    except Exception as e:  # noqa: BLE001
        logger.debug("remove_placement_group: %s", e)
