"""Run the measuring step on a Ray cluster (``--ray``): same images, same order, same result.

The selection ``items[start:]`` is cut into fixed blocks that end at the run's check points
(every ``meta.check_every`` items of the selection, counted from its start, whatever
``start``). Each image's statistics do not depend on the batch it falls in
(:meth:`vggnorm.runtime.network.FeatureNet.moments` pads every batch to the full batch size),
so a block's sums are exactly the sums of its images. Each worker is a Ray actor that builds the
network once (:func:`vggnorm.runtime.measure.feature_net`, the weights sent once through the
object store) and runs :func:`vggnorm.runtime.measure.measure` over a block, adding its
per-batch :class:`~vggnorm.runtime.measure.Counted` with ``plus``: the single-process step,
only elsewhere. The driver yields blocks in block order, holding back those that finish early,
so at one batch size the sums are the single-process run's to float64 rounding for any number
of workers, and the stats file written after each yielded block is a valid checkpoint. With
``--batch-size auto`` each worker fits the batch to its own device's memory; workers of other
batch sizes differ from a single run by the float32 rounding of the convolutions only (where
the kernels round by batch size at all).

Faults: a worker killed mid-block is restarted by Ray and its blocks retried
(``max_restarts``/``max_task_retries``); if Ray gives up, the block is re-submitted to another
worker, or to a fresh one. Closing the generator (end, Ctrl-C, error) cancels outstanding blocks
and kills the workers; the cluster is shut down only if this engine started it. A head that
stops answering ends the run with an error (the caller saves what was counted).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import DatasetError, VggnormError
from ..core.memory import Batching, BatchPlan
from ..core.statsrecord import StatsMeta
from ..core.topology import Loaded
from .data import Dataset
from .measure import CHECK_EVERY, Counted

#: Blocks queued on one worker at a time, so it never waits for the driver between blocks.
DEPTH = 2
#: Attempts of one block (after Ray's own retries) before the run fails.
BLOCK_ATTEMPTS = 3
#: How long the driver waits for a block before it checks that the cluster's head answers.
WAIT_S = 2.0
#: A head that has not answered for this long is lost: the run ends with its progress saved,
#: well before Ray itself gives up on its head (60 s) and terminates the driver process.
HEAD_GRACE_S = 15.0
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def _first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _answers(address: str) -> bool:
    """Whether a TCP connection to ``host:port`` opens within a second."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise VggnormError("running on Ray needs Ray: pip install 'vggnorm[ray]'") from e
    return ray


def _share() -> float:
    """This worker's part of its device, by the resources Ray gave it: its fraction of a GPU, or
    its CPUs of its node's (CPU workers on one node share its memory)."""
    import ray

    ctx = ray.get_runtime_context()
    assigned = ctx.get_assigned_resources()  # type: ignore[no-untyped-call]
    if assigned.get("GPU"):
        return min(1.0, float(assigned["GPU"]))
    try:
        nodes = ray.nodes()  # type: ignore[no-untyped-call]
        node = next(n for n in nodes if n["NodeID"] == ctx.get_node_id())
        return min(1.0, float(assigned["CPU"]) / float(node["Resources"]["CPU"]))
    except (StopIteration, KeyError, ZeroDivisionError):
        return 1.0


class Worker:
    """The body of one Ray actor (wrapped with ``ray.remote`` at run time, so that importing
    this module needs no Ray): the batch chosen for this worker's own device (its GPU, else its
    node's memory) and the network built once, then one block per call."""

    def __init__(
        self, loaded: Loaded, meta: StatsMeta, ds: Dataset, items: Sequence[str], threads: int,
        batch: int | Batching,
    ) -> None:  # fmt: skip
        os.environ.update(WORKER_ENV)
        from .measure import feature_net, resolve_batch

        self.plan = resolve_batch(loaded, meta, batch, _share())
        self.net = feature_net(loaded, meta, self.plan)
        self.ds = ds
        self.items = items
        self.meta = meta
        self.threads = threads

    def where(self) -> dict[str, Any]:
        """This worker's node, actor and process, and whether it can read the dataset root."""
        import ray

        ctx = ray.get_runtime_context()
        problem = None
        try:
            os.listdir(self.ds.root)
        except OSError as e:
            problem = f"{type(e).__name__}: {e.strerror or e}"
        return {
            "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "node_id": ctx.get_node_id(),
            "actor_id": ctx.get_actor_id(),
            "pid": os.getpid(),
            "problem": problem,
            "plan": self.plan,
        }

    def block(self, start: int, end: int, strict: bool) -> tuple[Counted, dict[str, Any]]:
        """The sums of ``items[start:end]``, counted and skipped images in order; ``end`` is the
        position after the block in the whole selection."""
        from .measure import measure

        t0 = time.monotonic()
        total: Counted | None = None
        stretches = measure(self.net, self.ds, self.items[start:end], self.meta.decode,
                            self.plan.batch, workers=self.threads, strict=strict)  # fmt: skip
        try:
            for counted in stretches:
                total = counted if total is None else total.plus(counted)
        finally:
            stretches.close()
        assert total is not None  # a block holds at least one item
        return replace(total, end=end), {"pid": os.getpid(), "seconds": time.monotonic() - t0}


@dataclass
class _Slot:
    """One worker as the driver sees it."""

    handle: Any
    where: dict[str, Any] = field(default_factory=dict)
    inflight: int = 0
    dead: bool = False  # Ray gave up on it: no new blocks until it is replaced
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    pids: set[int] = field(default_factory=set)


class RayEngine:
    """Where ``stats`` and ``verify`` run their forward passes: a Ray cluster.

    Call it as ``engine(loaded, ds, items, meta, batch, start, strict, on_plan)``: a generator of
    :class:`Counted`, one per block of ``items[start:]``, in order. With ``"auto"``
    (:class:`~vggnorm.core.memory.Batching`) each worker chooses its batch for its own device;
    ``on_plan`` gets the smallest, and ``report`` a line per worker, before the first block.

    Args:
        address: as ``ray.init`` takes it (``auto``, ``ray://host:10001``, ``host:port``); None
            starts a local cluster of this machine. If Ray is already initialised in this
            process, that connection is used and left open.
        workers: number of workers; default one per GPU, else one per ``cpus_per_worker`` CPUs.
        cpus_per_worker: CPUs each worker reserves (decoding threads, and the forward pass
            without GPUs).
        report: called with each line of the per-worker summary at the end of a run.
        max_restarts: Ray restarts of a killed worker (each retrying its queued blocks).
        init_kwargs: extra ``ray.init`` arguments when this engine starts or joins a cluster.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        workers: int | None = None,
        cpus_per_worker: float = 2,
        report: Callable[[str], None] | None = None,
        max_restarts: int = 3,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError("workers must be >= 1")
        if cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")
        self.address = address
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.report = report
        self.max_restarts = max_restarts
        self.init_kwargs = dict(init_kwargs or {})
        self.description = f"ray ({address or 'local cluster'})"
        self.lost = False  # the head stopped answering during the last run
        #: The workers of the current run (their ``where`` has ``pid``, ``node_ip``, ...).
        self.slots: list[_Slot] = []
        #: One line per worker after a completed run.
        self.summary: list[str] = []

    # -----------------------------------------------------------------------------------------

    def __call__(
        self, loaded: Loaded, ds: Dataset, items: Sequence[str], meta: StatsMeta,
        batch: int | Batching, start: int, strict: bool,
        on_plan: Callable[[BatchPlan], None] | None = None,
    ) -> Generator[Counted, None, None]:  # fmt: skip
        ray = _ray()
        started = False
        refs: dict[Any, tuple[int, _Slot]] = {}  # running blocks: start position, worker
        self.slots = []
        self.lost = False
        try:
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
                if self.address is None:
                    kwargs["include_dashboard"] = False
                try:
                    ray.init(address=self.address, **{**kwargs, **self.init_kwargs})
                except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
                    where = self.address or "a local cluster"
                    raise VggnormError(f"could not start or reach Ray at {where}: {e}") from e
                started = True
            run = self._run(ray, loaded, ds, items, meta, batch, start, strict, refs, on_plan)
            yield from run
        finally:
            self._stop(ray, refs, started)

    def _stop(self, ray: Any, refs: dict[Any, tuple[int, _Slot]], started: bool) -> None:
        """Cancel the outstanding blocks and kill the workers; a lost cluster is left alone
        (every call to it would wait for a head that is gone)."""
        if self.lost:
            return
        for ref in refs:
            with contextlib.suppress(Exception):  # finished, or its worker is gone
                ray.cancel(ref)
        for slot in self.slots:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(slot.handle, no_restart=True)
        if started:
            ray.shutdown()

    def _plan(self, ray: Any) -> tuple[int, dict[str, Any], int]:
        """Number of workers, their actor options, and decoding threads each."""
        res = ray.cluster_resources()
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        if self.workers is not None:
            n = self.workers
        elif gpus >= 1:
            n = int(gpus)
        else:
            n = max(1, int(cpus // self.cpus_per_worker))
        per_cpu = min(self.cpus_per_worker, cpus / n) if cpus else self.cpus_per_worker
        opts: dict[str, Any] = {"num_cpus": per_cpu}
        env = dict(WORKER_ENV)
        if gpus >= 1:
            opts["num_gpus"] = 1 if gpus >= n else gpus / n
            kind = f"{n} GPU worker(s)"
        else:
            kind = f"{n} CPU worker(s) x {per_cpu:g} CPUs"
        # Workers run the driver's very code where they see its path (a checkout on the shared
        # file system the dataset needs anyway), else the vggnorm installed on their node.
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = f"{here}{os.pathsep}${{PYTHONPATH}}"
        runtime_env = {"env_vars": env}
        opts.update(runtime_env=runtime_env, max_restarts=self.max_restarts,
                    max_task_retries=self.max_restarts)  # fmt: skip
        where = self.address or "local cluster"
        self.description = f"ray {ray.__version__} ({kind}, {where})"
        return n, opts, max(1, int(per_cpu))

    def _start(self, ray: Any, cls: Any, args: tuple[Any, ...]) -> _Slot:
        return _Slot(cls.remote(*args))

    def _run(
        self, ray: Any, loaded: Loaded, ds: Dataset, items: Sequence[str], meta: StatsMeta,
        batch: int | Batching, start: int, strict: bool, refs: dict[Any, tuple[int, _Slot]],
        on_plan: Callable[[BatchPlan], None] | None,
    ) -> Generator[Counted, None, None]:  # fmt: skip
        """Blocks of ``items[start:]`` on the workers, up to ``DEPTH`` queued on each, yielded in
        block order (those that finish early wait in ``done``)."""
        n, opts, threads = self._plan(ray)
        cls = ray.remote(Worker).options(**opts)
        # Weights and item list once into the object store; the dataset without its item list.
        args = (ray.put(loaded), meta, replace(ds, items=()), ray.put(tuple(items)), threads,
                batch)  # fmt: skip
        self.slots = [self._start(ray, cls, args) for _ in range(n)]
        self._check(ray, self.slots, ds)
        self._plans(on_plan)
        # Blocks end at the check points: a run's statistics at each one never depend on the
        # engine. A block's result (a few MB of sums) is small next to its forward passes.
        size = meta.check_every or CHECK_EVERY
        pending = [start, *range((start // size + 1) * size, len(items), size)]  # not submitted
        pending.reverse()
        done: dict[int, Counted] = {}
        attempts: dict[int, int] = {}
        position = start
        t0 = time.monotonic()
        while position < len(items):
            if position in done:
                counted = done.pop(position)
                position = counted.end
                yield counted
                continue
            self._submit(pending, refs, size, len(items), strict)
            ready = self._wait(ray, list(refs))
            for ref in ready:
                s, slot = refs.pop(ref)
                slot.inflight -= 1
                result = self._collect(ray, ref, s, slot, attempts)
                if result is None:  # Ray gave up on the worker: retry the block elsewhere
                    pending.append(s)  # first in line again
                    slot.dead = True
                    if not slot.inflight:  # its other queued blocks have come back too
                        self._replace(ray, cls, args, slot, ds)
                    continue
                done[s] = result
        self._summarize(time.monotonic() - t0)

    def _wait(self, ray: Any, refs: list[Any], num_returns: int = 1) -> list[Any]:
        """The next ``num_returns`` finished results; checks, while they are not there, that the
        cluster's head answers.

        Raises:
            VggnormError: the head has not answered for :data:`HEAD_GRACE_S` (the cluster is
                gone: its progress is saved by the caller, and ``--resume`` continues).
        """
        from ray.exceptions import RaySystemError

        address = ray.get_runtime_context().gcs_address
        silent_since: float | None = None
        while True:
            try:
                ready, _ = ray.wait(refs, num_returns=num_returns, timeout=WAIT_S)
            except (OSError, RaySystemError) as e:  # the raylet this driver talks to is gone
                self.lost = True
                raise VggnormError(f"lost the Ray cluster: {_first_line(e)}") from e
            if len(ready) == num_returns:
                return list(ready)
            if _answers(address):
                silent_since = None
                continue
            now = time.monotonic()
            silent_since = silent_since or now
            if now - silent_since >= HEAD_GRACE_S:
                self.lost = True
                raise VggnormError(
                    f"lost the Ray cluster: its head at {address} has not answered for "
                    f"{now - silent_since:.0f} s"
                )

    def _submit(
        self, pending: list[int], refs: dict[Any, tuple[int, _Slot]], size: int, n_items: int,
        strict: bool,
    ) -> None:  # fmt: skip
        """Queue pending blocks on the least busy workers, so blocks spread over all of them."""
        while pending:
            free = [x for x in self.slots if not x.dead and x.inflight < DEPTH]
            if not free:
                return
            slot = min(free, key=lambda x: x.inflight)
            s = pending.pop()
            end = min((s // size + 1) * size, n_items)  # the next check point
            ref = slot.handle.block.remote(s, end, strict)
            refs[ref] = (s, slot)
            slot.inflight += 1

    def _collect(
        self, ray: Any, ref: Any, s: int, slot: _Slot, attempts: dict[int, int]
    ) -> Counted | None:
        """A finished block's result; None when its worker died (the block is to be retried)."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            counted, info = ray.get(ref)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, VggnormError):
                raise cause from None
            raise VggnormError(
                f"Ray worker on node {slot.where.get('node_ip', '?')} failed on the "
                f"block at image {s}: {str(e).splitlines()[0]}"
            ) from e
        except RayActorError as e:
            attempts[s] = attempts.get(s, 0) + 1
            if attempts[s] >= BLOCK_ATTEMPTS:
                raise VggnormError(
                    f"the block at image {s} failed {attempts[s]} times on Ray workers "
                    f"(last: {str(e).splitlines()[0]})"
                ) from e
            return None
        slot.images += len(counted.images)
        slot.skipped += len(counted.skipped)
        slot.seconds += info["seconds"]
        slot.pids.add(info["pid"])
        return counted  # type: ignore[no-any-return]

    def _check(self, ray: Any, slots: list[_Slot], ds: Dataset) -> None:
        """Each worker's node and whether it reads the dataset root: a clear error if not."""
        from ray.exceptions import RayActorError, RayTaskError

        refs = [s.handle.where.remote() for s in slots]
        self._wait(ray, refs, len(refs))  # a worker may take long to start; a dead head does not
        try:
            wheres = ray.get(refs)
        except RayActorError as e:  # its __init__ failed (no Keras on the node, bad weights...)
            raise VggnormError(
                f"a Ray worker failed to start: {_first_line(e)}; is vggnorm installed on every "
                "node?"
            ) from e
        except RayTaskError as e:  # the worker could not even build the network
            cause = getattr(e, "cause", None)
            if isinstance(cause, VggnormError):
                raise cause from None
            raise VggnormError(f"a Ray worker failed to start: {str(e).splitlines()[0]}") from e
        for slot, where in zip(slots, wheres):
            slot.where = where
            if where["problem"]:
                raise DatasetError(
                    f"Ray worker on node {where['node_ip']} (node id {where['node_id'][:12]}) "
                    f"cannot read the dataset root {ds.root} ({where['problem']}): every node "
                    "must see the dataset at the same path (shared file system)"
                )

    def _plans(self, on_plan: Callable[[BatchPlan], None] | None) -> None:
        """Each worker's batch (a line per worker to ``report``), and the smallest to
        ``on_plan``: a resume runs every worker at the batch the stats file records."""
        plans: list[BatchPlan] = [slot.where["plan"] for slot in self.slots]
        if self.report:
            for k, (slot, plan) in enumerate(zip(self.slots, plans)):
                self.report(f"ray worker {k} on node {slot.where['node_ip']}: {plan.describe()}")
        if on_plan is not None:
            on_plan(min(plans, key=lambda p: (p.batch, -p.peak)))

    def _replace(self, ray: Any, cls: Any, args: tuple[Any, ...], slot: _Slot, ds: Dataset) -> None:
        """Swap a worker Ray gave up on for a fresh one."""
        with contextlib.suppress(Exception):
            ray.kill(slot.handle, no_restart=True)
        fresh = self._start(ray, cls, args)
        self._check(ray, [fresh], ds)
        slot.handle, slot.where, slot.dead = fresh.handle, fresh.where, False

    def _summarize(self, wall: float) -> None:
        self.summary = []
        total = sum(s.images for s in self.slots)
        for k, s in enumerate(self.slots):
            rate = s.images / s.seconds if s.seconds else 0.0
            self.summary.append(
                f"ray worker {k}: node {s.where.get('node_ip', '?')} actor "
                f"{str(s.where.get('actor_id', '?'))[:12]} pid(s) "
                f"{','.join(map(str, sorted(s.pids))) or '-'}: batch "
                f"{s.where['plan'].batch if 'plan' in s.where else '?'}, {s.images} images, "
                f"{rate:.1f} img/s, {s.skipped} skipped"
            )
        self.summary.append(
            f"ray: {total} images on {len(self.slots)} worker(s) in {wall:.1f} s "
            f"({total / wall if wall else 0.0:.1f} img/s)"
        )
        if self.report:
            for line in self.summary:
                self.report(line)
