"""Prometheus metrics of the model server, with TensorFlow Serving's metric names, labels and buckets.

Served at the path of `--monitoring_config_file` (TF Serving's MonitoringConfig; see serving_config.py). The metrics
TF Serving (or the TensorFlow C++ loader inside it) defines keep its names, label names and histogram buckets, so
dashboards and alerts written for TF Serving work unchanged:

    :tensorflow:serving:request_count{model_name, status}           requests by error code (OK, INVALID_ARGUMENT, ...)
    :tensorflow:serving:request_latency{model_name, API, entrypoint}   histogram, microseconds, successful requests
    :tensorflow:serving:runtime_latency{model_name, API, runtime}      histogram, microseconds, signature calls
    :tensorflow:serving:batching_session:queuing_latency{thread_pool_name}   histogram, microseconds (batching on)
    :tensorflow:serving:batching_session:wrapped_run_count          signature calls made for batches (batching on)
    :tensorflow:cc:saved_model:load_attempt_count{model_path, status}    version loads, "success" or "fail"
    :tensorflow:cc:saved_model:load_latency{model_path}              total microseconds spent loading

TF Serving's counters are exposed with exactly these sample names; prometheus_client would add `_total` to a
counter, so they are declared `untyped` (PromQL treats both alike). This server adds, under its own names:

    model_server_predict_requests_total{model_name, signature_name, status}   predicts by signature
    model_server_serving_version{model_name}                      the version answering requests that name none
    model_server_loaded_version{model_name, version, role}        1 per version in memory (role serving or standby)
    model_server_version_switches_total{model_name, reason}       newer_version or version_removed (a rollback)

Example:
    curl http://127.0.0.1:8501/monitoring/prometheus/metrics
"""

import prometheus_client
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# TF Serving's request and runtime latencies: Buckets::Exponential(10, 1.8, 33), i.e. 10 us * 1.8^i up to about
# 20 minutes; the queuing latency of batching: Exponential(100, 1.2, 52), up to about 1 s. Bounds are rounded to the
# 6 significant digits TF Serving prints them with, so their `le` labels read the same (but 10.0 for its 10).
LATENCY_BUCKETS = [float(f'{10 * 1.8 ** index:.6g}') for index in range(33)]
QUEUING_BUCKETS = [float(f'{100 * 1.2 ** index:.6g}') for index in range(52)]
# TF Serving's batch threads are named so unless batching_parameters sets thread_pool_name.
BATCH_THREAD_POOL = 'model_server_batch_threads'
# The canonical error code of each HTTP status this server answers, as TF Serving's request_count names them.
STATUS_CODES = {200: 'OK', 400: 'INVALID_ARGUMENT', 404: 'NOT_FOUND', 405: 'INVALID_ARGUMENT',
                411: 'INVALID_ARGUMENT', 413: 'RESOURCE_EXHAUSTED', 415: 'INVALID_ARGUMENT', 500: 'INTERNAL',
                501: 'UNIMPLEMENTED', 503: 'UNAVAILABLE'}
# The classic text format, which every Prometheus reads: all names here are plain (`:` included), so the page
# generate_latest writes is exactly that format, whatever newer version prometheus_client would announce.
CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'


class UntypedCounters(Collector):
    """Exposes prometheus_client counters under their own names, without the `_total` suffix, as TF Serving does."""

    def __init__(self, counters):
        self.counters = counters

    def collect(self):
        for counter in self.counters:
            for family in counter.collect():
                untyped = Metric(family.name, family.documentation, 'unknown')
                for sample in family.samples:
                    if sample.name == family.name + '_total':
                        untyped.add_sample(family.name, sample.labels, sample.value)
                yield untyped


class VersionCollector(Collector):
    """The versions a ModelRepository holds, read when scraped so the numbers always match GET /v1/models/NAME."""

    def __init__(self, repository):
        self.repository = repository

    def collect(self):
        name = self.repository.model_name
        served, standby = self.repository.loaded
        serving = GaugeMetricFamily(
            'model_server_serving_version', 'The version that answers requests naming no version.',
            labels=['model_name'])
        loaded = GaugeMetricFamily(
            'model_server_loaded_version', 'Versions in memory: the served one and its warm standby.',
            labels=['model_name', 'version', 'role'])
        if served is not None:
            serving.add_metric([name], served.version)
            loaded.add_metric([name, str(served.version), 'serving'], 1)
        if standby is not None:
            loaded.add_metric([name, str(standby.version), 'standby'], 1)
        yield serving
        yield loaded


class Metrics:
    """The server's metrics in a registry of their own; the record_* methods are called from any thread."""

    def __init__(self):
        prometheus_client.disable_created_metrics()
        self.registry = prometheus_client.CollectorRegistry()
        self.request_count = prometheus_client.Counter(
            ':tensorflow:serving:request_count', 'The total number of requests.', ['model_name', 'status'],
            registry=None)
        self.load_attempt_count = prometheus_client.Counter(
            ':tensorflow:cc:saved_model:load_attempt_count',
            'The number of times a SavedModel was successfully loaded.', ['model_path', 'status'], registry=None)
        self.load_latency = prometheus_client.Counter(
            ':tensorflow:cc:saved_model:load_latency',
            'Latency in microseconds for SavedModels that were successfully loaded.', ['model_path'], registry=None)
        self.wrapped_run_count = prometheus_client.Counter(
            ':tensorflow:serving:batching_session:wrapped_run_count',
            'Total count of run calls on the wrapped session', registry=None)
        self.registry.register(UntypedCounters([self.request_count, self.load_attempt_count, self.load_latency,
                                                self.wrapped_run_count]))
        self.request_latency = prometheus_client.Histogram(
            ':tensorflow:serving:request_latency',
            'Distribution of wall time (in microseconds) for Tensorflow Serving request.',
            ['model_name', 'API', 'entrypoint'], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.runtime_latency = prometheus_client.Histogram(
            ':tensorflow:serving:runtime_latency',
            'Distribution of wall time (in microseconds) for Tensorflow runtime.',
            ['model_name', 'API', 'runtime'], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queuing_latency = prometheus_client.Histogram(
            ':tensorflow:serving:batching_session:queuing_latency',
            'Distribution of wall time spent (in microseconds) in queuing', ['thread_pool_name'],
            buckets=QUEUING_BUCKETS, registry=self.registry)
        self.predict_requests = prometheus_client.Counter(
            'model_server_predict_requests', 'Predict requests by signature and error code.',
            ['model_name', 'signature_name', 'status'], registry=self.registry)
        self.version_switches = prometheus_client.Counter(
            'model_server_version_switches', 'Changes of the served version: to a newer one, or back to an older '
            'one when the served version was removed.', ['model_name', 'reason'], registry=self.registry)
        self.registry.register(prometheus_client.ProcessCollector(registry=None))

    def watch_versions(self, repository):
        self.registry.register(VersionCollector(repository))

    def record_request(self, model_name, api, status, seconds):
        """One REST request: TF Serving counts every request and times the successful ones."""
        self.request_count.labels(model_name, STATUS_CODES.get(status, 'UNKNOWN')).inc()
        if status == 200:
            self.request_latency.labels(model_name, api, 'REST').observe(seconds * 1e6)

    def record_predict(self, model_name, signature_name, status):
        self.predict_requests.labels(model_name, signature_name, STATUS_CODES.get(status, 'UNKNOWN')).inc()

    def record_runtime(self, model_name, seconds, requests=1):
        """One signature call that answered `requests` requests (more than one when batched)."""
        # TF Serving's label for the runtime of a SavedModel's session, the one that runs this model there.
        histogram = self.runtime_latency.labels(model_name, 'Predict', 'TF1')
        for _ in range(requests):
            histogram.observe(seconds * 1e6)

    def record_batch_call(self):
        self.wrapped_run_count.inc()

    def record_queuing(self, queued_seconds):
        histogram = self.queuing_latency.labels(BATCH_THREAD_POOL)
        for seconds in queued_seconds:
            histogram.observe(seconds * 1e6)

    def record_load(self, model_path, succeeded, seconds):
        self.load_attempt_count.labels(model_path, 'success' if succeeded else 'fail').inc()
        if succeeded:
            self.load_latency.labels(model_path).inc(seconds * 1e6)

    def record_switch(self, model_name, reason):
        self.version_switches.labels(model_name, reason).inc()

    def exposition(self):
        """The text page Prometheus scrapes."""
        return prometheus_client.generate_latest(self.registry)
