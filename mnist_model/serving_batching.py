"""Run predict requests on a signature, one by one or merged into batches as TF Serving's --enable_batching does.

Both runners are driven from the server's asyncio event loop: `await runner.run(served, signature_name, arrays,
alone, heavy)` returns {output name: this request's rows}, or raises RequestError. `alone` says that no other request
is in flight in the whole server; such a request makes its signature call in the event loop itself, which saves two
thread hand-overs, at the price of one call's wait for a request that arrives meanwhile.

Two lanes keep heavy work from blocking small predicts. `heavy` marks a request whose call may take long: one that
decodes images (string inputs), has more than HEAVY_ROWS rows, or came in a large body (model_server.py decides).
Heavy requests make their calls, one at a time, in the heavy lane's single thread (which also decodes large bodies);
light ones in the batch threads. So a one-row predict never waits behind a second of image decoding (before the
lanes: up to 7.8 s behind six 4096x4096 PNGs), and heavy requests use at most one core. A heavy request never runs
in the loop, even alone. Measured with one client (December
2026, 2 cores): p50 1.02 ms inline against 1.08 to 1.23 ms through the batch thread, and 0.94 to 0.98 ms against
1.17 ms with --enable_batching=false.

`DirectRunner` makes one signature call per request: concurrent requests call TensorFlow at the same time, each from
a thread of the server's request pool (TF Serving's unbatched behaviour).

`Batcher` queues each request's checked input arrays per signature, lane and input layout, in the event loop (one thread:
no locks). While fewer than `num_batch_threads` batches run, a queue is taken as a batch of up to `max_batch_size`
rows, as soon as it is full or its oldest request has waited `batch_timeout_micros` (a timer of the loop; 0: at
once, so under load a batch is whatever arrived while the previous call ran). The batch goes to a dedicated executor
of `num_batch_threads` threads, which concatenates the requests' rows along the first dimension and makes the one
signature call; TensorFlow releases the GIL while it computes, so the loop keeps reading requests meanwhile. When
the call is done, the loop starts the next batch from what queued meanwhile and answers every request with its own
rows of the outputs. As in TF Serving, a request with more rows than `max_batch_size` is refused (400), and one that
would make more than `max_enqueued_batches` batches wait gets 503. If a merged call fails, each of its requests is
run alone, so a request that cannot be answered (a picture that does not decode) fails on its own and the others get
the answers they would have had unbatched (within float32 rounding: matrix kernels add in another order for one row
than for several).

Example (in a coroutine of the event loop):
    runner = Batcher(BatchingParameters(max_batch_size=32), metrics=None, model_name='mnist', pool=pool)
    outputs = await runner.run(served, 'serving_default', {'pixels': pixels})   # {output name: numpy array}
"""

import asyncio
import collections
import concurrent.futures
import time

import numpy as np

from serving_json import RequestError, summarize_tf_error

# A request with more rows than this is heavy (see the module docstring): 64 rows take about 1 ms in the signature
# call, and a request that large comes in a body over model_server.INLINE_BODY_BYTES anyway.
HEAVY_ROWS = 64


def new_heavy_lane():
    """The heavy lane: one thread, so that heavy work queues for one core instead of taking both."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='heavy')


def call_signature(function, arrays):
    """Run a signature on numpy arrays and return its outputs as numpy arrays, or raise RequestError(400)."""
    import tensorflow as tf

    tensors = {name: tf.constant(array) for name, array in arrays.items()}
    try:
        outputs = function(**tensors)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
        raise RequestError(400, summarize_tf_error(error)) from None
    return {name: tensor.numpy() for name, tensor in outputs.items()}


class DirectRunner:
    """One signature call per request: a heavy one in the heavy lane's thread, a light one in the event loop when
    it is alone in the server, else in a thread of `pool`, so that concurrent requests compute at the same time."""

    def __init__(self, metrics, model_name, pool, heavy_lane):
        self.metrics = metrics
        self.model_name = model_name
        self.pool = pool
        self.heavy_lane = heavy_lane

    async def run(self, served, signature_name, arrays, alone=False, heavy=False):
        function = served.callers[signature_name]
        if heavy:
            return await asyncio.get_running_loop().run_in_executor(self.heavy_lane, self.call, function, arrays)
        if alone:
            return self.call(function, arrays)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.call, function, arrays)

    def call(self, function, arrays):
        started = time.perf_counter()
        outputs = call_signature(function, arrays)
        if self.metrics is not None:
            self.metrics.record_runtime(self.model_name, time.perf_counter() - started)
        return outputs

    def stop(self):
        pass

    def close(self):
        pass


class Task:
    """One request in a batch queue; `future` (of the event loop) gets its outputs or its error."""
    __slots__ = ('arrays', 'rows', 'key', 'enqueued', 'future', 'outputs', 'error')

    def __init__(self, arrays, rows, key, future):
        self.arrays = arrays
        self.rows = rows
        self.key = key
        self.enqueued = time.perf_counter()
        self.future = future
        self.outputs = None
        self.error = None


class Batcher:
    """Merges concurrent requests to the same signature into one call; see the module docstring. Every method but
    execute (which runs in a batch thread) and close runs in the event loop."""

    def __init__(self, parameters, metrics, model_name, pool, heavy_lane=None):
        self.parameters = parameters
        self.timeout_seconds = parameters.batch_timeout_micros / 1e6
        self.metrics = metrics
        self.model_name = model_name
        # The heavy lane is the server's (it decodes large bodies too); a Batcher made without one has its own.
        self.own_heavy_lane = heavy_lane is None
        heavy_lane = new_heavy_lane() if heavy_lane is None else heavy_lane
        self.direct = DirectRunner(metrics, model_name, pool, heavy_lane)
        # Per lane (index 0 light, 1 heavy): its executor, its number of threads and its batches running.
        self.executors = (concurrent.futures.ThreadPoolExecutor(parameters.num_batch_threads,
                                                                thread_name_prefix='batch'), heavy_lane)
        self.lane_threads = (parameters.num_batch_threads, 1)
        self.lane_running = [0, 0]
        # (signature caller, lane, input layout) -> Tasks not yet in a batch, oldest first; and their rows.
        self.queues = {}
        self.queued_rows = {}
        # Queues whose oldest request is waiting for batch_timeout_micros: key -> the loop's timer.
        self.timers = {}
        self.running = 0    # batches handed to either lane and not yet answered
        self.stopped = False

    async def run(self, served, signature_name, arrays, alone=False, heavy=False):
        """Answer one request through its signature's queue in its lane; returns {output name: this request's
        rows}."""
        rows = {array.shape[0] for array in arrays.values()}
        if not served.batchable[signature_name] or len(rows) != 1:
            # No common first dimension to merge along: the signature sees the request as it is.
            return await self.direct.run(served, signature_name, arrays, alone, heavy)
        rows = rows.pop()
        limit = self.parameters.max_batch_size
        if rows > limit:
            raise RequestError(400, f'Task size {rows} is larger than maximum input batch size {limit} (raise '
                                    'max_batch_size in --batching_parameters_file, or serve with '
                                    '--enable_batching=false)')
        function = served.callers[signature_name]
        lane = int(heavy)
        key = (function, lane,
               tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(arrays.items())))
        queued = self.queued_rows.get(key, 0)
        if -(-(queued + rows) // limit) > self.parameters.max_enqueued_batches:
            raise RequestError(503, 'The batch scheduling queue to which this task was submitted is full')
        loop = asyncio.get_running_loop()
        task = Task(arrays, rows, key, loop.create_future())
        if alone and not heavy and self.running == 0 and not self.queues and self.timeout_seconds == 0:
            # Nothing else in the server: the batch of one runs here (see the module docstring).
            self.execute([task])
            if task.error is not None:
                raise task.error
            return task.outputs
        self.queues.setdefault(key, collections.deque()).append(task)
        self.queued_rows[key] = queued + rows
        self.schedule(loop)
        return await task.future

    def schedule(self, loop):
        """While a lane has a free thread, start its next batch: from the lane's queue whose oldest request has
        waited longest among those that are ready (full, waited the timeout, or the server stops); a queue that
        is not ready yet gets a timer for the moment it will be."""
        limit = self.parameters.max_batch_size
        while self.queues:
            now = time.perf_counter()
            ready = [key for key, tasks in self.queues.items()
                     if self.lane_running[key[1]] < self.lane_threads[key[1]]
                     and (self.stopped or self.queued_rows[key] >= limit
                          or now - tasks[0].enqueued >= self.timeout_seconds)]
            if not ready:
                break
            key = min(ready, key=lambda ready_key: self.queues[ready_key][0].enqueued)
            self.start(loop, key[1], self.take(key))
        for key, tasks in self.queues.items():
            if key not in self.timers and self.lane_running[key[1]] < self.lane_threads[key[1]]:
                delay = tasks[0].enqueued + self.timeout_seconds - time.perf_counter()
                self.timers[key] = loop.call_later(max(0.0, delay), self.timed_out, loop, key)

    def timed_out(self, loop, key):
        del self.timers[key]
        self.schedule(loop)

    def take(self, key):
        """Remove and return the oldest tasks of a queue that fit in one batch."""
        tasks, batch, rows = self.queues[key], [], 0
        while tasks and (not batch or rows + tasks[0].rows <= self.parameters.max_batch_size):
            rows += tasks[0].rows
            batch.append(tasks.popleft())
        timer = self.timers.pop(key, None)
        if timer is not None:  # the queue's new oldest request has its own deadline
            timer.cancel()
        if tasks:
            self.queued_rows[key] -= rows
        else:
            del self.queues[key], self.queued_rows[key]
        return batch

    def start(self, loop, lane, batch):
        self.running += 1
        self.lane_running[lane] += 1
        self.executors[lane].submit(self.execute_and_hand_back, loop, batch)

    def execute_and_hand_back(self, loop, batch):
        """In a batch thread: run the batch, then let the loop answer it (one hand-over per batch)."""
        try:
            self.execute(batch)
        finally:
            try:
                loop.call_soon_threadsafe(self.finish, loop, batch)
            except RuntimeError:  # The loop is closed: the server has stopped and nobody waits for the answers.
                pass

    def finish(self, loop, batch):
        """In the loop: start the next batch first, so that TensorFlow computes while the answers are written."""
        self.running -= 1
        self.lane_running[batch[0].key[1]] -= 1
        self.schedule(loop)
        for task in batch:
            if task.future.done():  # the request was cancelled (its connection closed at shutdown)
                continue
            if task.error is not None:
                task.future.set_exception(task.error)
            else:
                task.future.set_result(task.outputs)

    def execute(self, tasks):
        """One signature call for all tasks; if it fails, one call per task so that each fails only for itself."""
        started = time.perf_counter()
        function = tasks[0].key[0]
        if self.metrics is not None:
            self.metrics.record_queuing([started - task.enqueued for task in tasks])
        if len(tasks) == 1:
            self.run_alone(function, tasks[0])
            return
        try:
            self.run_merged(function, tasks)
        except Exception:  # Find out which request failed: the others still get their answers.
            for task in tasks:
                self.run_alone(function, task)

    def run_merged(self, function, tasks):
        arrays = {name: np.concatenate([task.arrays[name] for task in tasks]) for name in tasks[0].arrays}
        outputs = self.timed_call(function, arrays, len(tasks))
        total = sum(task.rows for task in tasks)
        if any(array.ndim == 0 or array.shape[0] != total for array in outputs.values()):
            raise ValueError('an output has no batch dimension to split along')
        start = 0
        for task in tasks:
            task.outputs = {name: array[start:start + task.rows] for name, array in outputs.items()}
            start += task.rows

    def run_alone(self, function, task):
        try:
            task.outputs = self.timed_call(function, task.arrays, 1)
        except Exception as error:  # Raised again in the request's coroutine, which answers it.
            task.error = error

    def timed_call(self, function, arrays, requests):
        if self.metrics is not None:
            self.metrics.record_batch_call()  # Counted whether it succeeds or not, as TF Serving counts session runs.
        started = time.perf_counter()
        outputs = call_signature(function, arrays)
        if self.metrics is not None:
            self.metrics.record_runtime(self.model_name, time.perf_counter() - started, requests)
        return outputs

    def stop(self):
        """In the loop, when the server stops: batches wait no longer to fill, what is queued runs at once."""
        self.stopped = True
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        if self.queues:
            self.schedule(asyncio.get_running_loop())

    def close(self):
        """After the loop has ended: let the batch threads (and a heavy lane of its own) finish and end."""
        self.executors[0].shutdown(wait=True, cancel_futures=True)
        if self.own_heavy_lane:
            self.executors[1].shutdown(wait=True, cancel_futures=True)
