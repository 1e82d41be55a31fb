"""Run predict requests on a signature, one by one or merged into batches as TF Serving's --enable_batching does.

`DirectRunner` calls the signature in the request's own thread. `Batcher` queues each request's checked input
arrays per signature and input shape, and merges what is queued into one signature call: the requests' rows are
concatenated along the first dimension, and every request gets its own rows of the outputs. At most
`num_batch_threads` batches are formed or run at a time. A batch holds up to `max_batch_size` rows and is taken as
soon as it is full or its oldest request has waited `batch_timeout_micros` (0: at once, so under load a batch is
whatever arrived while the previous call ran). As in TF Serving, a request with more rows than `max_batch_size` is
refused (400), and one that would make more than `max_enqueued_batches` batches wait gets 503. If a merged call
fails, each of its requests is run alone, so a request that cannot be answered (a picture that does not decode)
fails on its own and the others get the answers they would have had unbatched (within float32 rounding: matrix
kernels add in another order for one row than for several).

The batches run in the threads of the requests themselves rather than in a pool of batch threads: the request that
finds a batch slot free leads, forms the batch (its own request included) and runs it, while the others wait on a
lock of their own; when it is done, it hands the slot to the oldest request still waiting. So a lone client pays for
no hand-over between threads, and under load every merged call saves the per-call cost of TensorFlow for all but one
of its requests.

Example:
    runner = Batcher(BatchingParameters(max_batch_size=32), metrics=None, model_name='mnist')
    outputs = runner.run(served, 'serving_default', {'pixels': pixels})   # {output name: numpy array}
"""

import threading
import time

import numpy as np

from serving_json import RequestError, summarize_tf_error


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
    """One signature call per request, in the request's thread."""

    def __init__(self, metrics, model_name):
        self.metrics = metrics
        self.model_name = model_name

    def run(self, served, signature_name, arrays):
        started = time.perf_counter()
        outputs = call_signature(served.signatures[signature_name], arrays)
        if self.metrics is not None:
            self.metrics.record_runtime(self.model_name, time.perf_counter() - started)
        return outputs

    def stop(self):
        pass


class Task:
    """One request in a batch queue. Its thread waits on `done`, released when `outputs` or `error` is set, or
    when the request is `promoted` to lead the next batch."""
    __slots__ = ('arrays', 'rows', 'key', 'enqueued', 'outputs', 'error', 'done', 'promoted')

    def __init__(self, arrays, rows, key):
        self.arrays = arrays
        self.rows = rows
        self.key = key
        self.enqueued = time.perf_counter()
        self.outputs = None
        self.error = None
        self.promoted = False
        # A bare lock is the cheapest one-shot signal between two threads in CPython.
        self.done = threading.Lock()
        self.done.acquire()

    @property
    def answered(self):
        return self.outputs is not None or self.error is not None


class Batcher:
    """Merges concurrent requests to the same signature into one call; see the module docstring."""

    def __init__(self, parameters, metrics, model_name):
        self.parameters = parameters
        self.timeout_seconds = parameters.batch_timeout_micros / 1e6
        self.metrics = metrics
        self.model_name = model_name
        self.direct = DirectRunner(metrics, model_name)
        # (signature function, input layout) -> Tasks not yet in a batch, oldest first; and their rows.
        self.queues = {}
        self.queued_rows = {}
        # Keys whose next batch a leader is forming, and the number of leaders (forming or running a batch).
        self.forming = set()
        self.leaders = 0
        self.lock = threading.Lock()
        # Signalled when a request joins a queue whose batch is being formed (the leader may wait for it to fill).
        self.joined = threading.Condition(self.lock)
        self.stopped = False

    def run(self, served, signature_name, arrays):
        """Answer one request through its signature's queue; returns {output name: this request's rows}."""
        rows = {array.shape[0] for array in arrays.values()}
        if not served.batchable[signature_name] or len(rows) != 1:
            # No common first dimension to merge along: the signature sees the request as it is.
            return self.direct.run(served, signature_name, arrays)
        rows = rows.pop()
        limit = self.parameters.max_batch_size
        if rows > limit:
            raise RequestError(400, f'Task size {rows} is larger than maximum input batch size {limit} (raise '
                                    'max_batch_size in --batching_parameters_file, or serve with '
                                    '--enable_batching=false)')
        function = served.signatures[signature_name]
        key = (function, tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(arrays.items())))
        task = Task(arrays, rows, key)
        with self.lock:
            if self.stopped:
                raise RequestError(503, 'the server is shutting down')
            queued = self.queued_rows.get(key, 0)
            if -(-(queued + rows) // limit) > self.parameters.max_enqueued_batches:
                raise RequestError(503, 'The batch scheduling queue to which this task was submitted is full')
            self.queues.setdefault(key, []).append(task)
            self.queued_rows[key] = queued + rows
            lead = self.leaders < self.parameters.num_batch_threads and key not in self.forming
            if lead:
                self.leaders += 1
                self.forming.add(key)
            elif key in self.forming:
                self.joined.notify_all()
        if not lead:
            task.done.acquire()
            lead = task.promoted
        if lead:
            self.lead(task)
        if task.error is not None:
            raise task.error
        return task.outputs

    def lead(self, own):
        """Form and run batches of own's queue (which this thread holds in `forming`) until own is answered."""
        while True:
            own.promoted = False
            with self.lock:
                batch = self.form(own.key)
            if batch:
                self.execute(batch)
            with self.lock:
                self.leaders -= 1
                self.promote()
            if own.answered:
                return
            # Own request did not fit in that batch: another leader answers it, or it is promoted to lead again.
            own.done.acquire()
            if not own.promoted:
                return

    def form(self, key):
        """Wait (holding the lock's condition) until the queue's batch is full or its oldest request has waited the
        timeout, take the batch, and let another waiting request lead the next one if a slot is free."""
        limit = self.parameters.max_batch_size
        while self.queued_rows.get(key, limit) < limit and not self.stopped:
            remaining = self.queues[key][0].enqueued + self.timeout_seconds - time.perf_counter()
            if remaining <= 0:
                break
            self.joined.wait(remaining)
        batch = self.take(key)
        self.forming.discard(key)
        self.promote()
        return batch

    def take(self, key):
        """Remove and return the oldest tasks of a queue that fit in one batch."""
        tasks, batch, rows = self.queues.get(key, []), [], 0
        while tasks and (not batch or rows + tasks[0].rows <= self.parameters.max_batch_size):
            rows += tasks[0].rows
            batch.append(tasks.pop(0))
        if tasks:
            self.queued_rows[key] -= rows
        elif key in self.queues:
            del self.queues[key], self.queued_rows[key]
        return batch

    def promote(self):
        """While fewer than num_batch_threads lead, wake the oldest waiting request of a queue nobody forms to lead
        its batch."""
        while self.leaders < self.parameters.num_batch_threads:
            heads = [tasks[0] for key, tasks in self.queues.items() if key not in self.forming]
            if not heads:
                return
            oldest = min(heads, key=lambda task: task.enqueued)
            self.leaders += 1
            self.forming.add(oldest.key)
            oldest.promoted = True
            oldest.done.release()

    def execute(self, tasks):
        """One signature call for all tasks; if it fails, one call per task so that each fails only for itself."""
        started = time.perf_counter()
        function = tasks[0].key[0]
        try:
            if len(tasks) == 1:
                self.run_alone(function, tasks[0])
            else:
                try:
                    self.run_merged(function, tasks)
                except Exception:  # Find out which request failed: the others still get their answers.
                    for task in tasks:
                        self.run_alone(function, task)
        finally:
            if self.metrics is not None:
                self.metrics.record_queuing([started - task.enqueued for task in tasks])
            for task in tasks:
                task.done.release()

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
        except Exception as error:  # Raised again in the request's own thread, which answers it.
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
        """Stop waiting for batches to fill: what is queued runs at once."""
        with self.lock:
            self.stopped = True
            self.joined.notify_all()
