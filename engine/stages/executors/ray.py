"""Run a stage's batches on a Ray cluster: Ray Data maps the driver's selection through a pool of stateful actors.

The driver selects the rows in DuckDB (ids, storage positions, text columns; no images) and hands them to
``RayExecutor.run``. Ray Data streams them, a few of the stage's batches per task (cut where the local
executor cuts its batches, so a model sees the same batches), through a pool of ``workers`` actors. Each actor calls the
stage's ``setup()`` once (a model loads once per actor; a GPU stage's actor holds ``num_gpus=1``, so vLLM or
transformers sees one GPU of its own), reads its rows' images by position through the picklable ``reader``, and
runs ``process()``. The outputs come back to the driver and are yielded in selection order; the runner commits
them, alone, at its usual cadence, so a Ray run killed at any point and started again does every row once,
exactly as a local run. Ingest's shards run on plain Ray tasks (``RayExecutor.stream``): each shard is one
task that streams its outputs back.

Ray is imported only here, and this module only when ``--executor ray`` is asked for.
"""

from __future__ import annotations

import heapq
import logging
import os
import pickle
import socket
import warnings
from collections import deque
from collections.abc import Iterator

import pyarrow as pa

SEQ = "__engine_seq"  # a selection row's index, carried through Ray so outputs can be put back in order


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster asked for cannot be reached."""


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise RayUnavailable('--executor ray needs Ray: pip install -e ".[ray]"') from error
    return ray


def _import_ray_data() -> None:
    """Ray Data (the ``data`` extra of ray), which the stages' pool runs on; ingest's tasks need only Ray."""
    try:
        import ray.data  # noqa: F401
    except ImportError as error:
        raise RayUnavailable('--executor ray needs Ray Data: pip install -e ".[ray]"') from error


GCS_PROBE_S = 3.0  # how long a cluster's GCS may take to answer the probe of ``_check_address``
# an HTTP/2 client's connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5)
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_address(address: str) -> None:
    """Fail fast with one line when ``host:port`` is not a Ray cluster: nothing answers there, or something
    answers that is not a GCS. ``ray.init`` would retry for minutes either way: it tries to reach the GCS
    ``RAY_NUM_REDIS_GET_RETRIES`` (20) times, each waiting ``py_gcs_connect_timeout_s`` (30 s) for a reply.

    A GCS is a gRPC server, and a gRPC server answers an HTTP/2 client's preface with its own SETTINGS frame
    at once: a port that accepts the connection but sends no such frame within ``GCS_PROBE_S`` (a plain TCP
    listener, the dashboard's HTTP port, another service) is not a GCS. Not probed: ``ray://`` addresses
    (the Ray Client server, which ``ray.init`` reaches with its own time-outs) and clusters that speak TLS
    (``RAY_USE_TLS``), whose servers wait for a TLS handshake first.
    """
    if address == "auto":
        return  # Ray finds the cluster this machine belongs to, and says so clearly when there is none
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayUnavailable(f"--ray-address {address!r} is not host:port (or ray://host:port, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=5) as connection:
            probe = not address.startswith("ray://") and os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true")
            if probe and not _answers_http2(connection):
                raise RayUnavailable(f"{address} accepts connections but is not a Ray cluster's GCS (no gRPC answer "
                                     f"within {GCS_PROBE_S:g} s); give the head node's GCS port (6379 unless "
                                     f"`ray start --head --port` said otherwise)")
    except OSError as error:
        raise RayUnavailable(f"no Ray cluster answers at {address} ({error.strerror or error})") from None


def _answers_http2(connection: socket.socket) -> bool:
    """Whether the server at the other end of ``connection`` answers an HTTP/2 preface with a SETTINGS
    frame (a frame header is 9 bytes; byte 3 is the frame type, 4 for SETTINGS) within ``GCS_PROBE_S``."""
    connection.settimeout(GCS_PROBE_S)
    try:
        connection.sendall(_HTTP2_PREFACE)
        header = b""
        while len(header) < 9:
            part = connection.recv(9 - len(header))
            if not part:
                return False  # closed without a frame
            header += part
    except OSError:  # socket.timeout included: silence
        return False
    return header[3] == 4


def connect(address: str | None = None, workers: int | None = None, **local_options):
    """Join the Ray cluster at ``address`` (default: ``$RAY_ADDRESS``, as Ray's own tools do), or start a
    local one with ``workers`` CPUs (default: all) when there is none, even if another Ray runs on this
    machine; a process already connected (e.g. by a test) stays on its cluster. Returns ``ray``."""
    ray = _import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_address(address)
    if ray.is_initialized():
        return ray
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as error:
            raise RayUnavailable(f"cannot join the Ray cluster at {address}: {error}") from None
    else:
        with warnings.catch_warnings():  # Lance warns on any fork; the processes Ray starts run no Lance
            warnings.filterwarnings("ignore", message="lance is not fork-safe")
            # "local": a new instance (ray.init() alone would join the newest one it finds on this machine)
            ray.init(address="local", num_cpus=workers, include_dashboard=False, **quiet, **local_options)
    return ray


class _StageActor:
    """One worker of the pool: sets the stage up once, then turns chunks of the selection into outputs.

    A chunk (one Ray task) holds several of the stage's batches; the actor processes them one by one, the
    next read ahead on a thread (``read_ahead``, as the local executor does), and returns one row per batch:
    where it starts in the selection, its row count, and the pickled ``StageOutput`` (Arrow tables pickle as
    IPC buffers) or the pickled exception the stage raised (Ray would wrap it and drop its type; the driver
    raises it as it was).
    """

    def __init__(self, stage, reader, batch_rows: int):
        from engine.stages.base import read_ahead

        self.stage, self.reader, self.batch_rows, self.read_ahead = stage, reader, batch_rows, read_ahead
        self.failed = None
        try:
            stage.setup()
        except Exception as error:  # reported with the first batch, as the stage's own error
            self.failed = error

    def __call__(self, chunk: pa.Table) -> pa.Table:
        first = chunk.column(SEQ)[0].as_py()
        starts, counts, outputs = [], [], []
        batches = self.read_ahead(chunk.drop_columns([SEQ]), self.reader, self.batch_rows)
        for start in range(0, len(chunk), self.batch_rows):
            try:
                if self.failed is not None:
                    raise self.failed
                output = self.stage.run_batch(next(batches))
            except Exception as error:
                output = _picklable(error)
            starts.append(first + start)
            counts.append(min(self.batch_rows, len(chunk) - start))
            outputs.append(pickle.dumps(output, protocol=5))
            if isinstance(output, Exception):
                break  # the driver raises it; the rest of the chunk would be thrown away
        return pa.table({SEQ: pa.array(starts, pa.int64()), "rows": pa.array(counts, pa.int64()),
                         "output": pa.array(outputs, pa.large_binary())})


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class RayExecutor:
    """Runs a stage's batches on Ray (see the module's docstring).

    Parameters
    ----------
    workers : int, optional
        Actors in the pool; each holds one CPU, or ``stage.needs.gpus`` GPUs for a stage that needs them.
        Default: as many as the cluster's CPUs (or GPUs) allow.
    address : str, optional
        A running cluster to join (``host:port``, ``ray://host:port`` or ``auto``); with none a local Ray starts
        with ``workers`` CPUs (default: all of this machine's).
    """

    name = "ray"

    start_timeout_s = 1800  # how long the whole pool may take to start and set up (a cluster adding nodes, a large model)

    def __init__(self, workers: int | None = None, address: str | None = None):
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be at least 1, not {workers}")
        if address:
            _check_address(address)  # before any work: a command fails at once on a wrong address
        self.workers, self.address = workers, address
        self._ray = None  # set when this executor connected the process to Ray (``close`` disconnects it)

    def _connect(self):
        """``connect``, noting whether this executor made the connection (a process already connected, say
        by a test, stays connected after ``close``)."""
        ray = _import_ray()
        if not ray.is_initialized():
            self._ray = ray
        return connect(self.address, self.workers)

    def close(self) -> None:
        """Disconnect from Ray (stopping a local Ray this executor started), if this executor connected.
        A command calls it when it ends: Ray's own exit hook would do the same after sleeping half a second."""
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    def run(self, stage, selection: pa.Table, reader, batch_rows: int) -> Iterator:
        """Yield the stage's ``StageOutput`` for each ``batch_rows`` rows of ``selection``, in selection order."""
        if len(selection) == 0:
            return
        ray = self._connect()
        _import_ray_data()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the runner shows one progress bar, whichever executor runs
        context.print_on_execution_start = False
        # every actor set up before the first batch goes out: the work spreads over the whole pool, and a
        # pool the cluster cannot hold fails with a clear error instead of waiting for ever
        context.wait_for_min_actors_s = self.start_timeout_s
        logging.getLogger("ray.data").setLevel(logging.ERROR)

        gpus = float(stage.needs.gpus or 0)
        resources = {"num_gpus": gpus} if gpus else {"num_cpus": 1}
        batches = -(-len(selection) // batch_rows)
        workers = min(self.workers or _fitting_workers(ray, gpus), batches)
        chunk_rows = batch_rows * _batches_per_task(batches, workers, batch_rows)
        numbered = selection.append_column(SEQ, pa.array(range(len(selection)), pa.int64()))
        # one block per task, cut at multiples of batch_rows: the stage sees the batches the local executor makes.
        # from_blocks keeps the blocks as they are and reads their metadata here (from_arrow runs a Ray task
        # per table for it: seconds on a busy machine before any work starts)
        blocks = [numbered.slice(start, chunk_rows) for start in range(0, len(numbered), chunk_rows)]
        outputs = ray.data.from_blocks(blocks).map_batches(
            _StageActor, fn_constructor_args=(stage, reader, batch_rows), batch_size=chunk_rows,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers), **resources)
        try:
            yield from _in_order(outputs.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2))
        except ray.exceptions.GetTimeoutError:
            each = f"{gpus:g} GPU" if gpus else "1 CPU"
            raise RayUnavailable(f"the Ray cluster could not start {workers} workers of {each} each within "
                                 f"{self.start_timeout_s} s (it has {_resources(ray)})") from None
        except ray.exceptions.RayError as error:
            raise _user_error(error) from None

    def stream(self, work, items) -> Iterator:
        """``work(item)``'s outputs for each item (ingest's shards), each item on a Ray task of one CPU, as
        many at once as ``workers`` (default: the cluster's CPUs; never more than it has, so that the task
        whose outputs are due next is always running); yielded in item order, each item's in its own order.

        A task streams its outputs (a Ray streaming generator) and pauses once ``STREAM_AHEAD`` of them wait
        unread: a task that runs ahead of the one being read holds a bounded amount of memory.
        """
        items = iter(items)
        first = next(items, _END)
        if first is _END:
            return
        ray = self._connect()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        at_once = min(self.workers or cpus, cpus)
        task = ray.remote(num_cpus=1, num_returns="streaming",
                          _generator_backpressure_num_objects=STREAM_AHEAD)(_stream_work)
        running = deque([task.remote(work, first)])
        try:
            while running:
                while len(running) < at_once and (item := next(items, _END)) is not _END:
                    running.append(task.remote(work, item))
                for ref in running[0]:
                    output = ray.get(ref)
                    if isinstance(output, Exception):
                        raise output
                    yield output
                running.popleft()
        except ray.exceptions.RayError as error:
            raise _user_error(error) from None
        finally:
            for generator in running:  # after an error, or a consumer that stopped early
                ray.cancel(generator)


_END = object()
STREAM_AHEAD = 4  # outputs a streaming task may hold unread before it pauses


def _stream_work(work, item):
    """A Ray task of ``RayExecutor.stream``: ``work(item)``'s outputs, or the exception it raised (yielded
    as a value, so the driver raises it as it was, not wrapped by Ray)."""
    try:
        yield from work(item)
    except Exception as error:
        yield _picklable(error)


TASKS_PER_WORKER = 4  # enough for each actor to have its next task queued while it works on one
MAX_TASK_ROWS = 1024  # a task's outputs reach the driver (and the store) together: keep them coming


def _batches_per_task(batches: int, workers: int, batch_rows: int) -> int:
    """How many of the stage's batches one Ray task carries: few tasks (each costs a round trip through
    Ray) but enough that every actor always has work queued, and not so large a result waits long."""
    spread = -(-batches // (workers * TASKS_PER_WORKER))
    return max(1, min(spread, MAX_TASK_ROWS // batch_rows))


def _resources(ray) -> str:
    total = ray.cluster_resources()
    return ", ".join(f"{total.get(kind, 0):g} {kind}" for kind in ("CPU", "GPU"))


def _fitting_workers(ray, gpus: float) -> int:
    """As many actors as the cluster holds: one per CPU, or one per ``gpus`` GPUs for a GPU stage."""
    resources = ray.cluster_resources()
    if gpus:
        fitting = int(resources.get("GPU", 0) // gpus)
        if not fitting:
            raise RayUnavailable(f"the stage needs {gpus:g} GPU per worker and the Ray cluster has fewer")
        return fitting
    return max(1, int(resources.get("CPU", 1)))


def _in_order(batches) -> Iterator:
    """The outputs ordered by where their batch starts in the selection (Ray may finish them out of order)."""
    waiting: list[tuple[int, int, bytes]] = []
    expected = 0
    for table in batches:
        columns = (table.column(name).to_pylist() for name in (SEQ, "rows", "output"))
        for start, rows, blob in zip(*columns):
            heapq.heappush(waiting, (start, rows, blob))
        while waiting and waiting[0][0] == expected:
            _, rows, blob = heapq.heappop(waiting)
            expected += rows
            output = pickle.loads(blob)
            if isinstance(output, Exception):
                raise output
            yield output
    if waiting:
        raise RuntimeError(f"Ray returned outputs starting at row {waiting[0][0]}, expected row {expected}")


def _user_error(error: BaseException) -> BaseException:
    """The exception under Ray's wrappers, where Ray kept it (a stage's own errors come back unwrapped)."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not type(current).__module__.startswith("ray."):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return error
