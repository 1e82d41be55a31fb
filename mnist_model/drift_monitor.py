"""The drift monitor as a process of its own, for KServe: it receives the CloudEvents of the InferenceService's
payload logger (spec.predictor.logger) and publishes the same drift gauges as the local model server.

KServe's logger posts every request and every successful response of the predictor to --port, path `/`, as
CloudEvents in binary mode (docs/monitoring.md has the exact headers): `ce-type` org.kubeflow.serving.inference.request
or .response, the two halves of one predict sharing `ce-id`, the body the client's JSON request or TF Serving's JSON
reply as they were. Once both halves of a predict have arrived, its inputs and probabilities go to the same
serving_drift.DriftWatcher the local server runs, against the profile of the version served: the largest version
under --model_base_path (the serving folder TF Serving polls; the logger does not say which version answered). For
predict_image requests the pixels the model classified are made by that version's image_pixels signature, so this
process imports TensorFlow once the first image arrives. Events in structured mode (application/cloudevents+json)
are read too.

Endpoints:
    POST /                  a logger CloudEvent: 200 (also for a predict the monitor cannot use: it is counted),
                            400 for a body that is not a CloudEvent of the logger
    GET  /metrics           Prometheus: model_drift_score, model_drift_alert, ... (serving_drift.py) and
                            model_drift_events_total{kind, outcome}
    GET  /monitoring/drift  the same state as JSON, as the local model server answers it
    GET  /healthz           200 "ok" (for the Deployment's probes)

Example:
    python3 mnist_model/drift_monitor.py --port 8080 --model_base_path /mnt/models --model_name mnist-model-server
"""

import argparse
import base64
import binascii
import collections
import http.server
import json
import os
import sys
import threading
import time

import numpy as np
import prometheus_client
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

from drift import DEFAULT_WINDOW
from serving_drift import DRIFT_PAGE, DriftWatcher
from serving_log import log_line
from serving_versions import list_versions

DEFAULT_MODEL_BASE_PATH = os.path.dirname(os.path.abspath(__file__))
REQUEST_TYPE = 'org.kubeflow.serving.inference.request'
RESPONSE_TYPE = 'org.kubeflow.serving.inference.response'
# Halves of predicts waiting for their other half; beyond this many the oldest are dropped (a logger in
# mode "request" or "response" only sends one half, and a half can be lost).
MAX_PENDING = 10_000
MAX_EVENT_BYTES = 16 * 1024 * 1024
# A served version is the largest under the folder, looked up again at most this often.
VERSION_CHECK_SECONDS = 1.0


class EventError(Exception):
    """A body or header that is not a payload logger CloudEvent; its message is one line."""


def read_event(headers, body):
    """(id, type, data bytes) of a CloudEvent in binary mode (ce-* headers, the data as the body) or structured mode
    (a JSON body with specversion, id, type and data or data_base64); raises EventError."""
    content_type = (headers.get('content-type') or '').split(';')[0].strip().lower()
    if content_type == 'application/cloudevents+json':
        try:
            event = json.loads(body)
        except ValueError as error:
            raise EventError(f'structured CloudEvent is not JSON: {error}') from None
        if not isinstance(event, dict):
            raise EventError('structured CloudEvent is not a JSON object')
        fields = event
        if 'data_base64' in event:
            try:
                data = base64.b64decode(event['data_base64'], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise EventError('data_base64 of the CloudEvent is not base64') from None
        else:
            data = json.dumps(event.get('data')).encode('utf-8')
    else:
        fields = {name: headers.get(f'ce-{name}') for name in ('specversion', 'id', 'type')}
        data = body
    if fields.get('specversion') != '1.0':
        raise EventError(f'not a CloudEvent 1.0 (ce-specversion {fields.get("specversion")!r})')
    if not fields.get('id'):
        raise EventError('the CloudEvent has no id')
    if fields.get('type') not in (REQUEST_TYPE, RESPONSE_TYPE):
        raise EventError(f'ce-type {str(fields.get("type"))[:100]!r} is not {REQUEST_TYPE} or {RESPONSE_TYPE}')
    return str(fields['id']), fields['type'], data


def decode_bytes(value):
    if isinstance(value, dict) and set(value) == {'b64'}:
        return base64.b64decode(value['b64'], validate=True)
    if isinstance(value, str):
        return value.encode('utf-8')
    raise ValueError('an image is not {"b64": ...} or a string')


def read_predict_body(body):
    """(signature name, {input name: array}) of a TF Serving REST predict body; raises ValueError or TypeError."""
    document = json.loads(body)
    signature = document.get('signature_name') or 'serving_default'
    if 'instances' in document:
        rows = document['instances']
        input_name = 'pixels' if signature == 'serving_default' else 'image_bytes'
        rows = [row[input_name] if isinstance(row, dict) and input_name in row else row for row in rows]
    else:
        rows = document['inputs']
        input_name = 'pixels' if signature == 'serving_default' else 'image_bytes'
        if isinstance(rows, dict):
            rows = rows[input_name]
    if signature == 'predict_image':
        return signature, {'image_bytes': np.array([decode_bytes(row) for row in rows], dtype=object)}
    return signature, {'pixels': np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)}


def read_reply_body(body):
    """{'probabilities': rows} of a TF Serving REST predict reply; raises ValueError, KeyError or TypeError."""
    document = json.loads(body)
    if 'predictions' in document:
        rows = [row['probabilities'] for row in document['predictions']]
    else:
        rows = document['outputs']['probabilities']
    return {'probabilities': np.asarray(rows, dtype=np.float32).reshape(-1, 10)}


class VersionFolder:
    """What the watcher needs of a served version: its number, folder and, loaded when first used (with
    TensorFlow), its signatures."""

    def __init__(self, version, path):
        self.version = version
        self.path = path
        self.loaded = None
        self.signatures = self

    def get(self, name):
        if self.loaded is None:
            import tensorflow as tf

            self.loaded = tf.saved_model.load(self.path)
        return self.loaded.signatures.get(name)


class EventMonitor:
    """Pairs the halves of logged predicts and feeds the watcher with the version served now."""

    def __init__(self, base_path, watcher):
        self.base_path = base_path
        self.watcher = watcher
        self.pending = collections.OrderedDict()     # id -> (type, data)
        self.lock = threading.Lock()
        self.counts = collections.Counter()          # (kind, outcome) -> events
        self.folders = {}                            # version -> VersionFolder
        self.versions = []
        self.checked_at = -1.0

    def served(self):
        """The VersionFolder of the largest version now, or None; the list is read again at most once a second."""
        now = time.monotonic()
        if now - self.checked_at >= VERSION_CHECK_SECONDS:
            self.checked_at = now
            try:
                self.versions = list_versions(self.base_path)
            except OSError as error:
                log_line(f'error: cannot list {self.base_path}: {error}')
        if not self.versions:
            return None
        version = self.versions[-1]
        if version not in self.folders:
            self.folders[version] = VersionFolder(version, os.path.join(self.base_path, str(version)))
        return self.folders[version]

    def loaded_versions(self):
        return set(self.versions[-2:])

    def receive(self, event_id, event_type, data):
        """Take one event; when it completes a predict, hand the predict to the watcher."""
        kind = 'request' if event_type == REQUEST_TYPE else 'response'
        with self.lock:
            other = self.pending.pop(event_id, None)
            if other is None or other[0] == event_type:
                self.pending[event_id] = (event_type, data)
                while len(self.pending) > MAX_PENDING:
                    self.pending.popitem(last=False)
                    self.counts['half', 'dropped'] += 1
                self.counts[kind, 'waiting'] += 1
                return
            request, reply = (data, other[1]) if kind == 'request' else (other[1], data)
            try:
                signature, inputs = read_predict_body(request)
                outputs = read_reply_body(reply)
                if len(outputs['probabilities']) != len(next(iter(inputs.values()))):
                    raise ValueError('the request and the reply hold different numbers of rows')
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
                self.counts['predict', 'unreadable'] += 1
                if self.counts['predict', 'unreadable'] <= 5:
                    log_line(f'Drift monitor: predict {event_id[:80]!r} not used: {type(error).__name__}: '
                             f'{str(error)[:200]}')
                return
            served = self.served()
            if served is None:
                self.counts['predict', 'no_version'] += 1
                return
            self.counts['predict', 'observed'] += 1
            self.watcher.observe(served, signature, inputs, outputs)


class EventCounts(Collector):
    def __init__(self, monitor):
        self.monitor = monitor

    def collect(self):
        family = CounterMetricFamily('model_drift_events', 'Logger events and predicts the monitor received, by '
                                     'outcome.', labels=['kind', 'outcome'])
        with self.monitor.lock:
            for (kind, outcome), count in sorted(self.monitor.counts.items()):
                family.add_metric([kind, outcome], count)
        yield family


def make_handler(monitor, registry):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def reply(self, status, body, content_type='application/json'):
            self.send_response(status)
            self.send_header('Content-Type', content_type)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = self.headers.get('Content-Length')
            if length is None or not length.isdigit() or int(length) > MAX_EVENT_BYTES:
                self.close_connection = True
                return self.reply(411 if length is None else 413,
                                  b'{"error": "send a body with a Content-Length of at most 16 MiB"}')
            body = self.rfile.read(int(length))
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                event = read_event(headers, body)
            except EventError as error:
                return self.reply(400, json.dumps({'error': str(error)}).encode('utf-8'))
            monitor.receive(*event)
            self.reply(200, b'')

        def do_GET(self):
            path = self.path.split('?', 1)[0]
            if path == '/metrics':
                return self.reply(200, prometheus_client.generate_latest(registry),
                                  'text/plain; version=0.0.4; charset=utf-8')
            if path == DRIFT_PAGE:
                return self.reply(200, monitor.watcher.page()[1])
            if path == '/healthz':
                return self.reply(200, b'ok', 'text/plain')
            self.reply(404, b'{"error": "not found: GET /metrics, /monitoring/drift or /healthz, POST / events"}')

        def log_message(self, format, *args):  # one line per event would bury the alert lines
            pass

    return Handler


def serve(host, port, base_path, model_name, window):
    """Receive events until SIGTERM or Ctrl-C; returns the exit code."""
    import signal

    if not os.path.isdir(base_path):
        log_line(f'error: --model_base_path {base_path} is not a folder')
        return 1
    monitor = EventMonitor(base_path, None)
    monitor.watcher = DriftWatcher(model_name, window, monitor.loaded_versions)
    prometheus_client.disable_created_metrics()
    registry = prometheus_client.CollectorRegistry()
    registry.register(monitor.watcher.collector())
    registry.register(EventCounts(monitor))
    try:
        server = http.server.ThreadingHTTPServer((host, port), make_handler(monitor, registry))
    except OSError as error:
        log_line(f'error: cannot listen on {host}:{port}: {error.strerror or error}')
        return 1
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log_line(f'Drift monitor for model {model_name} at http://{host}:{server.server_address[1]}/ (events), '
             f'/metrics and {DRIFT_PAGE}; profiles from {base_path}; window {window} inputs (Ctrl-C stops)')
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    server.server_close()
    monitor.watcher.close()
    log_line('Drift monitor stopped')
    return 0


def make_parser():
    parser = argparse.ArgumentParser(description='Receive KServe payload-logger CloudEvents and publish the drift '
                                                 'of the served model (docs/monitoring.md).')
    parser.add_argument('--port', type=int, default=8080, help='port for events and metrics (default: 8080)')
    parser.add_argument('--host', default='127.0.0.1',
                        help='address to listen on; 0.0.0.0 in a pod (default: 127.0.0.1)')
    parser.add_argument('--model_base_path', default=DEFAULT_MODEL_BASE_PATH,
                        help='the serving folder of integer versions, with their assets.extra/profile.json '
                             '(default: the mnist_model/ folder next to this script)')
    parser.add_argument('--model_name', default='mnist',
                        help='the model_name label of the metrics; on KServe the InferenceService name '
                             '(default: mnist)')
    parser.add_argument('--drift_window', type=int, default=DEFAULT_WINDOW,
                        help=f'inputs in the sliding window, at least 20 (default: {DEFAULT_WINDOW})')
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f'--port must be 0-65535, got {args.port}')
    if args.drift_window < 20:
        parser.error(f'--drift_window must be at least 20, got {args.drift_window}')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    return serve(args.host, args.port, os.path.abspath(args.model_base_path), args.model_name, args.drift_window)


if __name__ == '__main__':
    sys.exit(main())
