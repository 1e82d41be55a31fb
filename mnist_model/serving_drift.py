"""The drift monitor inside a model server: it watches what each served version is asked and answers, off the
request path, and publishes the scores as Prometheus gauges and as JSON.

The server calls `watcher.observe(served, signature_name, inputs, outputs)` once per answered predict, in its event
loop: that only appends the request's arrays to a bounded queue (about 2 us). A worker thread takes them in order,
every 0.1 s,
finds the pixels the model classified (the `pixels` input of serving_default; for predict_image the version's
`image_pixels` signature, the same preprocessing, run again on the request's bytes) and feeds drift.DriftMonitor
with them and the probabilities, against the version's assets.extra/profile.json. The cluster's monitor process
(drift_monitor.py) runs the very same watcher on the requests KServe's payload logger posts to it.

Published (drift.py has the signals, tests and thresholds):
    GET /monitoring/drift                            {"model_name", "window", "versions": [{"version", "alert",
                                                     "signatures": {name: {"signals": {signal: {"score",
                                                     "threshold"}}}}}], "queued_inputs_dropped", ...}
    model_drift_score{model_name, version, signature, signal}   -log10 p of the signal's test over the window
    model_drift_threshold{model_name, signal}                   the score at which an alert starts
    model_drift_alert{model_name, version}                      1 while the version's inputs drift, else 0
    model_drift_inputs_total{model_name, version, signature}    inputs the monitor has seen
    model_drift_dropped_inputs_total{model_name}                inputs not watched because the queue was full
Versions without a profile (exported before profiles were written) are counted and listed, not tested.

Example:
    watcher = DriftWatcher('mnist', window=200, loaded_versions=lambda: {1})
    watcher.observe(served, 'serving_default', {'pixels': pixels}, {'probabilities': probabilities})
    watcher.snapshot()
"""

import collections
import json
import threading

import numpy as np
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from drift import DEFAULT_STEP, DEFAULT_WINDOW, DriftMonitor, ProfileError, read_profile
from serving_log import log_line

DRIFT_PAGE = '/monitoring/drift'
# The signatures watched, and the input that holds what each one classifies (or the bytes to preprocess).
WATCHED_INPUTS = {'serving_default': 'pixels', 'predict_image': 'image_bytes'}
PIXELS_SIGNATURE = 'image_pixels'
# Inputs waiting for the worker. Beyond this the newest are dropped and counted: the monitor never slows serving.
MAX_QUEUED = 20_000
# The worker looks at its queue this often (or when a snapshot is asked for): one thread switch per pause rather than
# one per request, which with 8 clients cost the server 70 % more CPU per request.
WORKER_PAUSE = 0.1


class DriftWatcher:
    """A DriftMonitor fed from a queue by a worker thread of its own. `loaded_versions()` returns the versions still
    served (windows and alerts of others are dropped, so that a retired version's alert does not fire forever)."""

    def __init__(self, model_name, window=DEFAULT_WINDOW, loaded_versions=None, step=DEFAULT_STEP,
                 on_alert=log_line):
        self.monitor = DriftMonitor(model_name, window=window, step=step, on_alert=on_alert)
        self.loaded_versions = loaded_versions
        # Appended by observe() and taken by the worker: a deque's append and popleft are safe across threads.
        self.queue = collections.deque()
        self.queued = 0               # inputs in the queue or being processed
        self.dropped = 0
        self.count_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.seen = {}                # (version, signature) -> inputs observed, with or without a profile
        self.references = {}          # version -> {signature: Reference}, or the ProfileError text
        # The tests' module, imported now rather than by the first test in the middle of serving (0.2 s of CPU).
        import scipy.special  # noqa: F401
        self.worker = threading.Thread(target=self.work, name='drift-monitor', daemon=True)
        self.worker.start()

    def observe(self, served, signature_name, inputs, outputs):
        """Queue one answered predict: served has .version, .path and .signatures; inputs and outputs are the
        request's arrays by name. Cheap: the work happens in the worker thread."""
        input_name = WATCHED_INPUTS.get(signature_name)
        if input_name is None or input_name not in inputs or 'probabilities' not in outputs:
            return
        rows = len(outputs['probabilities'])
        with self.count_lock:
            if self.queued + rows > MAX_QUEUED:
                self.dropped += rows
                return
            self.queued += rows
        self.queue.append((served, signature_name, inputs[input_name], outputs['probabilities']))

    def work(self):
        """Every WORKER_PAUSE (or when woken), take everything queued and process it as one batch: the per-call
        costs of numpy and of the thread switch are paid once for many inputs."""
        while True:
            self.wake.wait(WORKER_PAUSE)
            self.wake.clear()
            batch = [self.queue.popleft() for _ in range(len(self.queue))]
            if batch:
                try:
                    self.process(batch)
                except Exception as error:  # the monitor must never stop watching for one bad batch
                    log_line(f'error: drift monitor: {type(error).__name__}: {str(error)[:300]}')
                with self.count_lock:
                    self.queued -= sum(len(item[3]) for item in batch)
            if self.stopping and not self.queue:
                return

    def process(self, batch):
        """Feed the monitor with a batch of queued predicts, in their order, merging neighbours of the same version
        and signature."""
        start = 0
        while start < len(batch):
            served, signature = batch[start][0], batch[start][1]
            end = start + 1
            while end < len(batch) and batch[end][0] is served and batch[end][1] == signature:
                end += 1
            group = batch[start:end]
            start = end
            key = (served.version, signature)
            probabilities = np.concatenate([item[3] for item in group]).reshape(-1, 10)
            self.seen[key] = self.seen.get(key, 0) + len(probabilities)
            references = self.references_of(served)
            if not isinstance(references, dict) or signature not in references:
                continue
            values = np.concatenate([np.asarray(item[2]).reshape(len(item[3]), -1) for item in group])
            pixels = values if signature == 'serving_default' else self.classified_pixels(served, values)
            if pixels is not None:
                self.monitor.observe(served.version, signature, references[signature], pixels, probabilities)

    def references_of(self, served):
        """The version's {signature: Reference}, read once; or why it has none (logged once)."""
        references = self.references.get(served.version)
        if references is None:
            try:
                references = read_profile(served.path)
            except ProfileError as error:
                references = str(error)
                log_line(f'Drift monitor: version {served.version} of model {self.monitor.model_name} is not '
                         f'watched: {error}')
            self.references[served.version] = references
        return references

    def classified_pixels(self, served, image_bytes):
        """What predict_image classified for these images: the version's image_pixels signature on the same bytes;
        None (and logged once) if the version has no such signature."""
        function = served.signatures.get(PIXELS_SIGNATURE)
        if function is None:
            message = f'version {served.version} has no {PIXELS_SIGNATURE} signature'
            if self.references.get(served.version) != message:
                log_line(f'Drift monitor: predict_image requests to version {served.version} are not watched: '
                         f'{message} (exported before drift monitoring)')
                self.references[served.version] = message
            return None
        import tensorflow as tf

        return function(image_bytes=tf.constant(np.asarray(image_bytes, dtype=object).reshape(-1)))['pixels'].numpy()

    def snapshot(self):
        """The monitor's state as a JSON-ready dict, for the served versions only. Wakes the worker, so that a
        client polling until queued_inputs is 0 waits for the work, not for the pause."""
        self.wake.set()
        if self.loaded_versions is not None:
            loaded = self.loaded_versions()
            for version in [version for version in self.monitor.alerts if version not in loaded]:
                self.monitor.forget(version)
        state = self.monitor.snapshot()
        state['inputs_seen'] = {f'{version}/{signature}': count for (version, signature), count in
                                sorted(self.seen.items())}
        state['versions_not_watched'] = {str(version): problem for version, problem in sorted(self.references.items())
                                         if isinstance(problem, str)}
        state['queued_inputs'] = self.queued
        state['queued_inputs_dropped'] = self.dropped
        return state

    def page(self):
        """GET /monitoring/drift as (content type, body, extra headers), the model server's page convention."""
        return 'application/json', json.dumps(self.snapshot(), indent=1).encode('utf-8'), []

    def collector(self):
        return DriftCollector(self)

    def close(self, timeout=5.0):
        self.stopping = True
        self.wake.set()
        self.worker.join(timeout)


class DriftCollector(Collector):
    """The watcher's state as Prometheus metrics, read when scraped."""

    def __init__(self, watcher):
        self.watcher = watcher

    def collect(self):
        state = self.watcher.snapshot()
        name = state['model_name']
        score = GaugeMetricFamily('model_drift_score', 'Drift score of a signal over the last window of inputs: '
                                  '-log10 of its test\'s p-value against the version\'s profile.',
                                  labels=['model_name', 'version', 'signature', 'signal'])
        threshold = GaugeMetricFamily('model_drift_threshold', 'The drift score at which an alert starts.',
                                      labels=['model_name', 'signal'])
        alert = GaugeMetricFamily('model_drift_alert', '1 while the inputs of the version drift from its profile.',
                                  labels=['model_name', 'version'])
        inputs = CounterMetricFamily('model_drift_inputs', 'Inputs the drift monitor has seen.',
                                     labels=['model_name', 'version', 'signature'])
        dropped = CounterMetricFamily('model_drift_dropped_inputs', 'Inputs not watched because the drift '
                                      'monitor\'s queue was full.', labels=['model_name'])
        thresholds = {}
        for version in state['versions']:
            alert.add_metric([name, str(version['version'])], 1.0 if version['alert'] else 0.0)
            for signature, watched in version['signatures'].items():
                for signal, values in watched['signals'].items():
                    thresholds[signal] = values['threshold']
                    if values['score'] is not None:
                        score.add_metric([name, str(version['version']), signature, signal], values['score'])
        for signal, value in thresholds.items():
            threshold.add_metric([name, signal], value)
        for key, count in state['inputs_seen'].items():
            version, signature = key.split('/', 1)
            inputs.add_metric([name, version, signature], count)
        dropped.add_metric([name], state['queued_inputs_dropped'])
        yield from (score, threshold, alert, inputs, dropped)
