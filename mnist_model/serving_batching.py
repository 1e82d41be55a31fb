"""Run predict requests on a signature, one by one or merged into batches as TF Serving's --enable_batching does.

`DirectRunner` calls the signature in the request's own thread. `Batcher` queues each request's checked input
arrays per signature and input shape; `num_batch_threads` threads each take the oldest queue's requests, up to
`max_batch_size` rows in total, concatenate them along the first dimension, make one signature call and hand every
request its own rows of the outputs. A queue is taken as soon as a thread is free and either it holds
`max_batch_size` rows or its oldest request has waited `batch_timeout_micros` (0: at once, so under load a batch is
whatever arrived while the previous call ran). As in TF Serving, a request with more rows than `max_batch_size` is
refused (400), and one that would make more than `max_enqueued_batches` batches wait gets 503. If a merged call
fails, each of its requests is run alone, so a request that cannot be answered (a picture that does not decode)
fails on its own and the others get the answers they would have had unbatched (within float32 rounding: matrix
kernels add in another order for one row than for several).

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
    """One request waiting in a batch queue; `done` is released once `outputs` or `error` is set."""
    __slots__ = ('arrays', 'rows', 'enqueued', 'outputs', 'error', 'done')

    def __init__(self, arrays, rows):
        self.arrays = arrays
        self.rows = rows
        self.enqueued = time.perf_counter()
        self.outputs = None
        self.error = None
        # A bare lock is the cheapest one-shot signal between two threads in CPython.
        self.done = threading.Lock()
        self.done.acquire()


class Batcher:
    """Merges concurrent requests to the same signature into one call; see the module docstring."""

    def __init__(self, parameters, metrics, model_name):
        self.parameters = parameters
        self.timeout_seconds = parameters.batch_timeout_micros / 1e6
        self.metrics = metrics
        self.model_name = model_name
        self.direct = DirectRunner(metrics, model_name)
        # (signature function, input layout) -> list of Tasks, oldest first; and the rows queued in each.
        self.queues = {}
        self.queued_rows = {}
        self.condition = threading.Condition()
        self.stopped = False
        self.threads = [threading.Thread(target=self.work, name=f'batch-{index}', daemon=True)
                        for index in range(parameters.num_batch_threads)]
        for thread in self.threads:
            thread.start()

    def run(self, served, signature_name, arrays):
        """Answer one request through its signature's queue; returns {output name: this request's rows}."""
        rows = {array.shape[0] for array in arrays.values()}
        if not served.batchable[signature_name] or len(rows) != 1:
            # No common first dimension to merge along: the signature sees the request as it is.
            return self.direct.run(served, signature_name, arrays)
        rows = rows.pop()
        limit = self.parameters.max_batch_size
        if rows > limit:
            raise RequestError(400, f'Task size {rows} is larger than maximum input batch size {limit} '
                                    '(max_batch_size in --batching_parameters_file)')
        function = served.signatures[signature_name]
        key = (function, tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(arrays.items())))
        task = Task(arrays, rows)
        with self.condition:
            if self.stopped:
                raise RequestError(503, 'the server is shutting down')
            queued = self.queued_rows.get(key, 0)
            if -(-(queued + rows) // limit) > self.parameters.max_enqueued_batches:
                raise RequestError(503, 'The batch scheduling queue to which this task was submitted is full')
            self.queues.setdefault(key, []).append(task)
            self.queued_rows[key] = queued + rows
            self.condition.notify()
        task.done.acquire()
        if task.error is not None:
            raise task.error
        return task.outputs

    def next_ready(self):
        """The queue to take now (the one with the oldest ready request), or (None, seconds until one is ready)."""
        now = time.perf_counter()
        ready, oldest, wait = None, None, None
        for key, tasks in self.queues.items():
            head = tasks[0].enqueued
            if self.queued_rows[key] >= self.parameters.max_batch_size or now - head >= self.timeout_seconds:
                if oldest is None or head < oldest:
                    ready, oldest = key, head
            else:
                remaining = head + self.timeout_seconds - now
                wait = remaining if wait is None else min(wait, remaining)
        return ready, wait

    def take(self, key):
        """Remove and return the oldest tasks of a queue that fit in one batch."""
        tasks, batch, rows = self.queues[key], [], 0
        while tasks and (not batch or rows + tasks[0].rows <= self.parameters.max_batch_size):
            rows += tasks[0].rows
            batch.append(tasks.pop(0))
        if tasks:
            self.queued_rows[key] -= rows
        else:
            del self.queues[key], self.queued_rows[key]
        return batch

    def work(self):
        while True:
            with self.condition:
                while True:
                    if self.stopped and not self.queues:
                        return
                    key, wait = self.next_ready()
                    if key is not None:
                        break
                    self.condition.wait(wait)
                tasks = self.take(key)
            self.execute(key[0], tasks)

    def execute(self, function, tasks):
        """One signature call for all tasks; if it fails, one call per task so that each fails only for itself."""
        started = time.perf_counter()
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
        """Answer what is queued, then end the batch threads."""
        with self.condition:
            self.stopped = True
            self.condition.notify_all()
        for thread in self.threads:
            thread.join(timeout=5)
