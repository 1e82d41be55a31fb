"""Serve exported SavedModels over TensorFlow Serving's REST API, for laptops without TF Serving.

The notebook and any TF Serving REST client work unchanged against this server: the same URLs, request and reply
bodies, error shapes, flags and configuration files as `tensorflow_model_server --rest_api_port`. It loads
`<model_base_path>/<integer version>/` folders with `tf.saved_model.load` (the artefact TF Serving loads; no project
code in the path), serves the largest version, keeps the one before it loaded as a warm standby, and polls the folder:
a newly exported version replaces the served one, and when the served version's folder is renamed away (a rollback)
the standby takes over at once; no request fails during either (serving_versions.py). Folders whose names are not
integers (`.tmp-*` exports being written, `.retired-*`, `data/`, `test_data/`) are ignored. If every version folder
disappears, the last loaded version stays in service (TF Serving would unload it).

Endpoints (NAME is --model_name, N an integer version; without /versions/N the largest version answers):
    GET  /v1/models/NAME[/versions/N]             model status: {"model_version_status": [...]}
    GET  /v1/models/NAME[/versions/N]/metadata    signature_def of the SavedModel
    POST /v1/models/NAME[/versions/N]:predict     {"signature_name"?, "instances" | "inputs"} ->
                                                  {"predictions"} (row format) or {"outputs"} (columnar format)
    GET  <prometheus_config.path>                 Prometheus metrics, with --monitoring_config_file
    GET  /monitoring/drift                        the drift monitor's scores and alerts (serving_drift.py)
    GET  / and /draw                              a page to draw a digit on and see what the model reads (draw.html)
Request bodies may be gzip-compressed (Content-Encoding: gzip) and sent chunked (Transfer-Encoding: chunked).
A predict with a small body is parsed, checked and answered in the event loop; concurrent predicts are merged
there into one signature call, which a batch thread makes while the loop reads the next requests
(serving_batching.py; on by default, unlike TF Serving: --enable_batching=false turns it off). Large or compressed
bodies are decoded in a thread pool, so that the loop never stalls on them. Per-request log lines are opt-in
(--access_log), and stderr can never block a request, even when nobody reads it (serving_log.py).
Errors are {"error": "..."} with HTTP 400 (bad HTTP, JSON, body, path or version label; images over
--max_image_pixels_per_request), 404 (unknown model or version), 405 (wrong method), 408 (head or body too slow,
or the body past --body_deadline_seconds), 411 (no length), 413 (body over --max_request_bytes, also once
decompressed; answered at once), 415 (other compression), 431 (head too large), 501 (other transfer coding) or 503
(batch queue full, --max_connections reached, or the bodies held by all connections at --max_body_memory_bytes).
Under pressure from many clients the server's memory and every client's wait stay bounded (serving_limits.py,
serving_http.py): a server-wide body budget with a share kept for small requests, back-pressure on connections whose
replies are not read, a heavy lane for image decoding and large requests, a connection cap below the descriptor
limit, and memory given back to the system after a burst. The HTTP layer is uvicorn with httptools, with the limits of
serving_http.py; SIGTERM and Ctrl-C let requests in flight finish (--shutdown_grace_seconds), then exit 0.
docs/serving.md has the details.

Example:
    python3 mnist_model/model_server.py --rest_api_port=8501 --model_name=mnist
    curl -d '{"instances": [[0, 0, ..., 0]]}' http://127.0.0.1:8501/v1/models/mnist:predict   # 784 pixels 0-255
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import json
import os
import re
import socket
import sys
import threading
import time
import typing
import warnings


from serving_batching import HEAVY_ROWS, Batcher, DirectRunner, new_heavy_lane
from serving_config import (BatchingParameters, ConfigError, boolean, non_negative_float, non_negative_int,
                            port_number, positive_float, positive_int, read_batching_parameters,
                            read_monitoring_config)
from serving_http import IN_FLIGHT, TRUNCATED, HttpLimits, listen, printable, serve_app
from serving_json import RequestError, encode_predict_reply, gunzip, parse_json, read_predict_request
from serving_limits import BodyBudget, MemoryTrimmer, connection_cap, describe_cap, request_pixels
from serving_log import StderrPump, log_line
from serving_versions import ModelRepository, list_versions

DEFAULT_MODEL_BASE_PATH = os.path.dirname(os.path.abspath(__file__))
# The drawing page, at paths TF Serving's REST API does not use. It may load nothing from elsewhere: its policy
# allows its own inline script and style, data: images, and requests to this server only.
DRAW_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'draw.html')
DRAW_PAGE_PATHS = ('/', '/draw')
DRAW_PAGE_HEADERS = [(b'content-security-policy', b"default-src 'none'; script-src 'unsafe-inline'; "
                      b"style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'"),
                     (b'cache-control', b'no-cache')]
# Threads for the work that would stall the event loop: large replies, GET requests while others are in flight, and
# the signature calls of --enable_batching=false. Large or compressed bodies are decoded in the heavy lane's one
# thread (serving_batching.py), so that at most one is parsed at a time: parsing holds the GIL, and 64 threads
# parsing at once would leave the event loop a 65th of it.
REQUEST_THREADS = 64
# A predict body up to this size (uncompressed) is parsed and checked in the event loop (a 784-pixel row is 3 KB, and
# takes about 50 us); a larger one in a pool thread.
INLINE_BODY_BYTES = 64 * 1024
# A reply of at most this many output values is written in the event loop (orjson: about 10 us per 1 000).
INLINE_REPLY_VALUES = 4096
# TensorFlow's inter-op threads, unless --tensorflow_inter_op_parallelism says otherwise (see serve()).
DEFAULT_INTER_OP_THREADS = max(8, os.cpu_count() or 1)
# Memory is given back to the system (serving_limits.MemoryTrimmer) once no request has finished for this long.
TRIM_IDLE_SECONDS = 1.0
# Requests for a model name this server does not serve are counted under this model_name label value.
UNKNOWN_MODEL_LABEL = '<unknown>'
URL_PATTERN = re.compile(
    r'^/v1/models/(?P<name>[^/:]+)'
    r'(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?'
    r'(?P<suffix>/metadata|:[a-z]+)?$')


class ServerSettings(typing.NamedTuple):
    """Everything the command line sets, as values (see main() for their meaning)."""
    host: str = '127.0.0.1'
    port: int = 8501
    model_name: str = 'mnist'
    model_base_path: str = DEFAULT_MODEL_BASE_PATH
    poll_wait_seconds: float = 1.0
    max_request_bytes: int = 16 * 1024 * 1024
    max_body_memory_bytes: int = 128 * 1024 * 1024     # BodyBudget (serving_limits.py)
    small_body_reserve_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    access_log: bool = False
    metrics_path: typing.Optional[str] = None           # None: no Prometheus metrics
    batching: typing.Optional[object] = None            # serving_config.BatchingParameters, or None: no batching
    inter_op_threads: int = DEFAULT_INTER_OP_THREADS
    intra_op_threads: int = 0  # 0: TensorFlow's default (one per core)
    max_load_retries: int = 5
    load_retry_seconds: float = 60.0
    limits: HttpLimits = HttpLimits()                   # connections, timeouts and the shutdown grace
    drift_window: int = 200                             # inputs in the drift monitor's window; 0: no monitor


def model_status(repository, version):
    """Reply body of GET /v1/models/NAME[/versions/N]."""
    states = repository.version_states()
    if version is not None:
        states = [(number, state) for number, state in states if number == version]
        if not states:
            raise RequestError(404, f'Could not find version {version} of model {repository.model_name}')
    if not states:
        raise RequestError(404, f'Could not find any versions of model {repository.model_name}')
    return {'model_version_status': [
        {'version': str(number), 'state': state, 'status': {'error_code': 'OK', 'error_message': ''}}
        for number, state in states]}


def find_served(repository, version):
    """Return the ServedVersion a request names (None = the served one), or raise RequestError(404)."""
    served = repository.find(version)
    if served is None:
        request = f'Latest({repository.model_name})' if version is None \
            else f'Specific({repository.model_name}, {version})'
        raise RequestError(404, f'Servable not found for request: {request}')
    return served


def model_metadata(served, model_name):
    """Reply body of GET /v1/models/NAME[/versions/N]/metadata."""
    return {'model_spec': {'name': model_name, 'signature_name': '', 'version': str(served.version)},
            'metadata': {'signature_def': {'signature_def': served.signature_defs}}}


def draw_page(model_name):
    """The drawing page as (content type, UTF-8 bytes, extra headers), with the served model's name filled in. Read
    at every request, so an edited page shows on reload."""
    import html

    with open(DRAW_PAGE, encoding='utf-8') as page:
        payload = page.read().replace('{{model_name}}', html.escape(model_name)).encode('utf-8')
    return 'text/html; charset=utf-8', payload, DRAW_PAGE_HEADERS


def parse_path(path):
    """Split a REST API path into (model name, suffix, version); raise RequestError(400) for malformed paths."""
    match = URL_PATTERN.match(path.split('?', 1)[0])
    if match is None:
        raise RequestError(400, f'Malformed request: {path[:200]}')
    if match['label'] is not None:
        # TF Serving answers so when no version labels are configured, and this server has none.
        raise RequestError(400, f'Unrecognized servable version label: {match["label"][:100]}')
    version = match['version']
    if version is not None:
        # ASCII digits only: str.isdigit() also accepts digits such as "\u00b2" that int() refuses.
        if not (version.isascii() and version.isdigit()) or len(version) > 18:
            raise RequestError(400, f'Malformed request: version must be an integer, got "{version[:100]}"')
        version = int(version)
    suffix = match['suffix'] or ''
    if suffix not in ('', '/metadata', ':predict', ':classify', ':regress'):
        raise RequestError(400, f'Malformed request: {path[:200]}')
    return match['name'], suffix, version


def check_model_name(name, suffix, version, model_name):
    """Raise RequestError(404) as TF Serving does for a model name it does not serve."""
    if name != model_name:
        name = name[:100]
        if suffix == '':
            raise RequestError(404, f'Could not find any versions of model {name}')
        request = f'Latest({name})' if version is None else f'Specific({name}, {version})'
        raise RequestError(404, f'Servable not found for request: {request}')


class Workers(typing.NamedTuple):
    """The server's threads besides the event loop and the batch threads (see REQUEST_THREADS)."""
    pool: concurrent.futures.ThreadPoolExecutor
    heavy_lane: concurrent.futures.ThreadPoolExecutor


class Exchange:
    """One request's reply and the labels it is counted under, filled in by RestApp.answer; and the bytes of the
    body budget its body holds until it is answered."""

    __slots__ = ('status', 'payload', 'content_type', 'headers', 'close', 'counted', 'model_label', 'api',
                 'signature_name', 'body_share')

    def __init__(self):
        self.body_share = 0
        self.status = 200
        self.payload = b''
        self.content_type = 'application/json'
        self.headers = []
        self.close = False
        # Labels of the request in the metrics: TF Serving's model_name and API, and the predict signature.
        self.counted = False
        self.model_label = UNKNOWN_MODEL_LABEL
        self.api = self.signature_name = ''

    def fail(self, status, message, allow=None):
        # The json module's layout, as before orjson answered predicts: clients may print these bodies as they are.
        self.status, self.payload = status, json.dumps({'error': message}).encode('utf-8')
        self.content_type = 'application/json'
        self.headers = [(b'allow', allow.encode())] if allow else []


class RequestHead(typing.NamedTuple):
    """The request headers the server reads. The HTTP layer has already refused duplicate or non-numeric
    Content-Length headers and a Content-Length beside a Transfer-Encoding."""
    content_length: typing.Optional[bytes]
    transfer_encoding: typing.Optional[bytes]
    content_encoding: bytes


def read_head(headers):
    content_length = transfer_encoding = None
    content_encoding = b''
    for name, value in headers:
        if name == b'content-length':
            content_length = value
        elif name == b'transfer-encoding':
            transfer_encoding = value if transfer_encoding is None else transfer_encoding + b', ' + value
        elif name == b'content-encoding':
            content_encoding = value
    return RequestHead(content_length, transfer_encoding, content_encoding)


class ClientGone(Exception):
    """The client went away or timed out while its body was read: there is nobody to answer."""


class RestApp:
    """TF Serving's REST API as an ASGI application, in the event loop. A predict with a small body is decoded,
    parsed and checked in the loop (about 50 us for a 784-pixel row), joins the runner's batch queue there, and its
    reply is written there too; only the signature call runs in a batch thread (serving_batching.py). A larger body
    (over INLINE_BODY_BYTES, or compressed) is decoded and checked in the heavy lane's thread, so that the loop never
    stalls on it, and then joins the heavy lane's batches; large replies are written in a thread of the pool. Other
    requests are answered in the loop when they are alone in the server, else in the pool. Every body holds its
    share of the server's body budget from before it is read until its request is answered."""

    def __init__(self, settings, repository, runner, metrics, workers):
        self.settings = settings
        self.repository = repository
        self.runner = runner
        self.metrics = metrics
        self.workers = workers
        self.budget = BodyBudget(settings.max_body_memory_bytes, settings.small_body_reserve_bytes)
        self.trimmer = MemoryTrimmer()
        self.trim_timer = None
        self.last_finished = 0.0
        self.body_bytes_since_trim = 0
        # Pages outside the REST API, by path: a function returning (content type, body bytes, extra headers) for
        # GET.
        self.pages = {path: lambda: draw_page(settings.model_name) for path in DRAW_PAGE_PATHS}
        self.drift = None  # serving_drift.DriftWatcher, with --drift_window > 0

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return
        started = time.perf_counter()
        method = scope['method']
        query = scope['query_string']
        # The target as sent (llhttp refuses control bytes in it); printable() escapes anything else in log lines.
        path = scope['raw_path'].decode('latin-1') + ('?' + query.decode('latin-1') if query else '')
        head = read_head(scope['headers'])
        exchange = Exchange()
        self.label(exchange, method, path)
        try:
            try:
                body = await self.read_body(scope, receive, method, head, exchange)
            except RequestError as error:
                exchange.close = True
                exchange.fail(error.status, error.message)
            except ClientGone:
                return
            else:
                in_flight = scope.get(IN_FLIGHT, ())
                if is_heavy_body(body, head):
                    predict = await asyncio.get_running_loop().run_in_executor(
                        self.workers.heavy_lane, self.answer, exchange, method, path, body, head)
                elif method == 'POST' or len(in_flight) <= 1:
                    predict = self.answer(exchange, method, path, body, head)
                else:
                    predict = await asyncio.get_running_loop().run_in_executor(
                        self.workers.pool, self.answer, exchange, method, path, body, head)
                del body  # the parsed arrays are all a predict still needs
                if predict is not None:
                    await self.predict(exchange, method, path, predict, len(in_flight) <= 1)
            headers = [(b'content-type', exchange.content_type.encode()),
                       (b'content-length', str(len(exchange.payload)).encode()), *exchange.headers]
            if exchange.close:
                headers.append((b'connection', b'close'))
            await send({'type': 'http.response.start', 'status': exchange.status, 'headers': headers})
            await send({'type': 'http.response.body', 'body': exchange.payload})
            self.record(scope, method, path, exchange, time.perf_counter() - started)
        finally:
            if exchange.body_share:
                self.budget.resize(exchange.body_share, 0)
                self.body_bytes_since_trim += exchange.body_share
            self.note_finished()

    async def read_body(self, scope, receive, method, head, exchange):
        """The request body as sent (unchunked, not yet decompressed), within --max_request_bytes; b'' for a
        request without one. Raises RequestError, or ClientGone."""
        limit = self.settings.max_request_bytes
        if head.transfer_encoding is not None:
            codings = [coding.strip().lower() for coding in head.transfer_encoding.split(b',') if coding.strip()]
            if codings != [b'chunked']:
                coding_text = printable(head.transfer_encoding.decode('latin-1'), 100)
                raise RequestError(501, f'Transfer-Encoding "{coding_text}" is not supported: send the body chunked '
                                        'or with a Content-Length')
            length = None
        elif head.content_length is None:
            if method == 'POST':
                raise RequestError(411, 'a POST request needs a Content-Length header or a chunked body')
            return b''
        else:
            length = int(head.content_length)
            if length == 0:
                return b''
            # Both answered before any of the body is read: a client that sent Expect: 100-continue never gets
            # "100 Continue", and the HTTP layer reads and drops what others already send.
            if length > limit:
                raise RequestError(413, f'request body of {length} bytes is over the limit of {limit} bytes '
                                        '(--max_request_bytes)')
            if not self.budget.resize(0, length):
                raise RequestError(503, self.budget.refusal(length))
            exchange.body_share = length
        parts, size = [], 0
        while True:
            message = await receive()
            if message['type'] != 'http.request':
                raise ClientGone
            chunk = message['body']
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f'chunked request body of more than {limit} bytes is over the limit '
                                        '(--max_request_bytes)')
            if size > exchange.body_share:  # a chunked body takes its share as it arrives
                if not self.budget.resize(exchange.body_share, size):
                    raise RequestError(503, self.budget.refusal(None))
                exchange.body_share = size
            parts.append(chunk)
            if not message.get('more_body', False):
                break
        if scope.get(TRUNCATED):
            raise RequestError(400, 'the request body is shorter than its Content-Length' if length is not None
                               else 'malformed chunked request body: it ended before its last chunk')
        if length is None:
            exchange.close = True  # RFC 9112: after a Transfer-Encoding body the connection is not reused.
        return parts[0] if len(parts) == 1 else b''.join(parts)

    def answer(self, exchange, method, path, body, head):
        """Route one request and fill in its reply, or return the checked predict still to run as (served version,
        PredictRequest). Every failure becomes {"error": ...}."""
        # Other methods on a page's path are REST API requests, answered "Malformed request" as any path outside it.
        page = self.pages.get(path.split('?', 1)[0]) if method == 'GET' else None
        try:
            if page is not None:
                exchange.content_type, exchange.payload, exchange.headers = page()
            elif method not in ('GET', 'POST'):
                exchange.close = True
                exchange.fail(405, f'method {method} is not allowed: use GET or POST')
            else:
                reply = self.answer_api(exchange, method, path, body, head)
                if not isinstance(reply, bytes):
                    return reply
                exchange.payload = reply
        except Exception as error:
            self.fail(exchange, method, path, error)
        return None

    async def predict(self, exchange, method, path, predict, alone):
        """Run a checked predict (in its lane's batch queue) and fill in its reply."""
        served, request, heavy = predict
        try:
            outputs = await self.runner.run(served, request.signature_name, request.arrays, alone, heavy)
            # The drift monitor sees every answered predict once, after batching split the outputs per request. It
            # only enqueues what it needs here, in the loop; its work runs in a thread of its own (serving_drift.py).
            if self.drift is not None:
                self.drift.observe(served, request.signature_name, request.arrays, outputs)
            if sum(array.size for array in outputs.values()) <= INLINE_REPLY_VALUES:
                exchange.payload = encode_predict_reply(outputs, request.row_format)
            else:
                exchange.payload = await asyncio.get_running_loop().run_in_executor(
                    self.workers.pool, encode_predict_reply, outputs, request.row_format)
        except Exception as error:
            self.fail(exchange, method, path, error)

    def fail(self, exchange, method, path, error):
        """Fill in the reply to a request that failed: its RequestError, or 500 for anything else."""
        if isinstance(error, RequestError):
            exchange.fail(error.status, error.message,
                          allow=('POST' if ':' in path.split('?', 1)[0].rsplit('/', 1)[-1] else 'GET')
                          if error.status == 405 else None)
            return
        # The server keeps answering whatever one request does.
        log_line(f'Internal error on "{printable(method + " " + path)}": {type(error).__name__}: '
                 f'{printable(str(error), 300)}')
        exchange.close = True
        exchange.fail(500, f'internal server error: {type(error).__name__}')

    def answer_api(self, exchange, method, path, body, head):
        """Answer a request to TF Serving's REST API (/v1/models/...): returns the JSON reply body, or for a predict
        (served version, PredictRequest) to run."""
        repository = self.repository
        name, suffix, version = parse_path(path)
        check_model_name(name, suffix, version, repository.model_name)
        if method == 'GET':
            if suffix not in ('', '/metadata'):
                raise RequestError(405, f'use POST for {suffix}')
            if suffix == '':
                return json.dumps(model_status(repository, version)).encode('utf-8')
            return json.dumps(model_metadata(find_served(repository, version), repository.model_name)).encode('utf-8')
        if suffix in ('', '/metadata'):
            raise RequestError(405, 'use GET for model status and metadata')
        exchange.api = suffix[1:]
        if suffix != ':predict':
            raise RequestError(400, f'{suffix} is not supported by this server: the SavedModel has predict '
                                    'signatures only, use :predict')
        served = find_served(repository, version)
        document = parse_json(decode_body(body, head.content_encoding, self.settings.max_request_bytes))
        try:
            request = read_predict_request(served, document)
        except (ValueError, TypeError, OverflowError, RecursionError) as error:
            # A body that no check above foresaw is still the client's error, never the server's.
            raise RequestError(400, f'malformed predict request: {type(error).__name__}: '
                                    f'{printable(str(error), 200)}') from None
        exchange.signature_name = request.signature_name
        has_strings = any(array.dtype == object for array in request.arrays.values())
        if has_strings:
            pixels = request_pixels(request.arrays)
            if pixels > self.settings.max_image_pixels:
                raise RequestError(400, f'the images of this request decode to {pixels} pixels, over the limit of '
                                        f'{self.settings.max_image_pixels} per request '
                                        '(--max_image_pixels_per_request): send them in several requests')
        heavy = has_strings or is_heavy_body(body, head) or \
            any(array.ndim and array.shape[0] > HEAVY_ROWS for array in request.arrays.values())
        return served, request, heavy

    def note_finished(self):
        """A request is done: memory is given back to the system once no request has finished for
        TRIM_IDLE_SECONDS (a timer of the loop, armed at most once at a time)."""
        loop = asyncio.get_running_loop()
        self.last_finished = loop.time()
        if self.trim_timer is None and self.trimmer.function is not None:
            self.trim_timer = loop.call_later(TRIM_IDLE_SECONDS, self.trim_when_idle)

    def trim_when_idle(self):
        loop = asyncio.get_running_loop()
        idle = loop.time() - self.last_finished
        if idle < TRIM_IDLE_SECONDS:
            self.trim_timer = loop.call_later(TRIM_IDLE_SECONDS - idle, self.trim_when_idle)
            return
        self.trim_timer = None
        if self.trimmer.needed(self.body_bytes_since_trim):
            self.body_bytes_since_trim = 0
            self.workers.pool.submit(self.trim)

    def trim(self):
        started = time.perf_counter()
        given_back = self.trimmer.trim()
        if given_back >= 64 * 1024 * 1024:
            log_line(f'Gave {given_back / 1e6:.0f} MB of memory back to the system after a burst of requests '
                     f'(malloc_trim, {(time.perf_counter() - started) * 1000:.0f} ms)')

    def label(self, exchange, method, path):
        """Whether the request counts in the metrics (REST API requests do), and its model_name label."""
        target = path.split('?', 1)[0]
        exchange.counted = method == 'POST' or (method == 'GET' and target not in self.pages)
        # Only the served model's name labels metrics: a label per invented name would grow the page without end.
        match = URL_PATTERN.match(target)
        if match is not None and match['name'] == self.repository.model_name:
            exchange.model_label = self.repository.model_name

    def record(self, scope, method, path, exchange, seconds):
        """The request's access log line (with --access_log) and metrics (with --monitoring_config_file)."""
        if self.settings.access_log:
            client = scope['client'][0] if scope.get('client') else '-'
            request_line = printable(f'{method} {path} HTTP/{scope["http_version"]}')
            log_line(f'{client} "{request_line}" {exchange.status} {len(exchange.payload)} {seconds * 1000:.1f}ms')
        metrics = self.metrics
        if metrics is not None and exchange.counted:
            metrics.record_request(exchange.model_label, exchange.api, exchange.status, seconds)
            if exchange.api == 'predict':
                metrics.record_predict(exchange.model_label, exchange.signature_name, exchange.status)

    def record_refused(self, client, status):
        """A request the HTTP layer refused (bad syntax, timeouts, too many connections): an access line only."""
        if self.settings.access_log:
            log_line(f'{client[0] if client else "-"} "-" {status}')


def is_heavy_body(body, head):
    """Whether a body is decoded in the heavy lane: a large one, or a compressed one (which may inflate to
    --max_request_bytes)."""
    return len(body) > INLINE_BODY_BYTES or head.content_encoding.strip().lower() not in (b'', b'identity')


def decode_body(body, content_encoding, limit):
    """The body decompressed as its Content-Encoding says, or raise RequestError."""
    encoding = content_encoding.strip().lower()
    if encoding in (b'', b'identity'):
        return body
    if encoding in (b'gzip', b'x-gzip'):
        return gunzip(body, limit)
    raise RequestError(415, f'Content-Encoding "{printable(encoding.decode("latin-1"), 100)}" is not supported: '
                            'send gzip or no encoding')


def serve(settings):
    """Load the newest version, serve until SIGINT/SIGTERM, and shut down cleanly. Returns the exit code."""
    if not os.path.isdir(settings.model_base_path):
        log_line(f'error: model base path {settings.model_base_path} is not a folder')
        return 1
    try:
        sock = listen(settings.host, settings.port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            log_line(f'error: port {settings.port} is in use on {settings.host}: stop the other server or pass '
                     '--rest_api_port=N (0 picks a free port)')
        else:
            log_line(f'error: cannot listen on {settings.host}:{settings.port}: {error.strerror or error}')
        return 1
    metrics = None
    if settings.metrics_path is not None:
        from serving_monitoring import Metrics
        metrics = Metrics()
    # With polling off nothing can be retired while the server runs, so a standby would only cost memory.
    repository = ModelRepository(settings.model_base_path, settings.model_name,
                                 keep_standby=settings.poll_wait_seconds > 0, metrics=metrics,
                                 max_load_retries=settings.max_load_retries,
                                 load_retry_seconds=settings.load_retry_seconds)
    if metrics is not None:
        metrics.watch_versions(repository)
    workers = Workers(concurrent.futures.ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix='request'),
                      new_heavy_lane())
    runner = DirectRunner(metrics, settings.model_name, *workers) if settings.batching is None \
        else Batcher(settings.batching, metrics, settings.model_name, *workers)
    app = RestApp(settings, repository, runner, metrics, workers)
    if metrics is not None:
        from serving_monitoring import CONTENT_TYPE
        app.pages[settings.metrics_path] = lambda: (CONTENT_TYPE, metrics.exposition(), [])
    if settings.drift_window:
        from serving_drift import DRIFT_PAGE, DriftWatcher
        app.drift = DriftWatcher(settings.model_name, settings.drift_window, lambda: {
            served.version for served in repository.loaded if served is not None})
        app.pages[DRIFT_PAGE] = app.drift.page
        if metrics is not None:
            metrics.registry.register(app.drift.collector())
    import tensorflow  # imported here so the load time logged below is the model's alone

    # Before anything runs: TensorFlow runs a signature's ops in its inter-op threads (one per core by default), and
    # one predict_image call kept both of a 2-core machine's busy decoding, so one-row predicts waited for it (p99
    # 600 ms against 30 to 60 ms with 4 or 8 threads, docs/serving.md). Idle threads cost nothing.
    tensorflow.config.threading.set_inter_op_parallelism_threads(settings.inter_op_threads)
    tensorflow.config.threading.set_intra_op_parallelism_threads(settings.intra_op_threads)
    repository.refresh(load_standby=False)
    try:
        found = list_versions(settings.model_base_path)
    except OSError:
        found = None  # refresh() has logged why the folder cannot be listed; the poll keeps trying.
    if found == []:
        log_line(f'No versions of servable {settings.model_name} found under base path {settings.model_base_path}. '
                 f"Did you forget to name your leaf directory as a number (eg. '/1/')? Export one with "
                 f'`python3 mnist_model/mnist.py`; until then status and predict requests answer 404.')
    poller = None
    if settings.poll_wait_seconds > 0:
        poller = threading.Thread(target=repository.poll, args=(settings.poll_wait_seconds,), daemon=True)
        poller.start()
    address = f'http://{settings.host}:{sock.getsockname()[1]}'
    log_line(f'Serving model {settings.model_name} over REST at {address}/v1/models/{settings.model_name} '
             f'(polling {settings.model_base_path} every {settings.poll_wait_seconds:g} s; '
             f'batching {describe_batching(settings.batching)}; Ctrl-C stops)')
    if settings.metrics_path is not None:
        log_line(f'Prometheus metrics at {address}{settings.metrics_path}')
    # The connection cap leaves descriptors for everything else: at the descriptor limit the kernel would keep new
    # clients waiting in the listen queue (asyncio stops accepting for a second at each EMFILE) instead of either
    # serving or refusing them.
    max_connections, soft_limit = connection_cap(settings.limits.max_connections)
    lowered = describe_cap(settings.limits.max_connections, max_connections, soft_limit)
    if lowered is not None:
        log_line(lowered)

    def stopping():
        log_line(f'Shutting down: no new connections; requests in flight get up to '
                 f'{settings.limits.shutdown_grace_seconds:g} s (--shutdown_grace_seconds)')
        repository.stop()
        # Called in the signal handler, which runs in the event loop's thread between two of its steps: the
        # batcher's state may only change in a step of its own.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_soon_threadsafe(runner.stop)

    serve_app(app, sock, settings.limits._replace(max_connections=max_connections), on_bad_request=app.record_refused,
              on_stopping=stopping)
    repository.stop()
    runner.close()
    if app.drift is not None:
        app.drift.close()
    for executor in workers:
        executor.shutdown(wait=True, cancel_futures=True)
    if poller is not None:
        poller.join(timeout=5)
    log_line('Server stopped')
    return 0


def describe_batching(parameters):
    if parameters is None:
        return 'off'
    return 'on: ' + ', '.join(f'{name} {value}' for name, value in parameters._asdict().items())


def free_port(host='127.0.0.1'):
    """Return a TCP port that is free on host right now (for tests and benchmarks that start a server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch(model_base_path, port, extra_args=(), log_file=None, wait_for_version=True, timeout=120):
    """Start this server as a subprocess on 127.0.0.1:port and wait until it answers; returns the Popen object.

    extra_args are more command-line flags; log_file receives the server's stdout and stderr (None: discarded; a
    file object or subprocess.PIPE). With wait_for_version, returns once a version is AVAILABLE (the largest one: it
    is loaded before the server answers), else once the REST API answers at all. Raises RuntimeError if the server
    exits or does not answer within timeout seconds. Stop it with process.terminate() (SIGTERM) and process.wait().
    """
    import subprocess
    import urllib.error
    import urllib.request

    command = [sys.executable, os.path.abspath(__file__), f'--rest_api_port={port}',
               f'--model_base_path={model_base_path}', *extra_args]
    process = subprocess.Popen(command, stdout=log_file or subprocess.DEVNULL, stderr=log_file or subprocess.DEVNULL)
    status_url = f'http://127.0.0.1:{port}/v1/models/{model_name_of(extra_args)}'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f'model server exited with code {process.returncode}')
        try:
            with urllib.request.urlopen(status_url, timeout=5) as reply:
                if not wait_for_version or b'"AVAILABLE"' in reply.read():
                    return process
        except urllib.error.HTTPError as error:
            if error.code == 404 and not wait_for_version:
                return process
        except OSError:
            pass
        time.sleep(0.1)
    process.terminate()
    process.wait(timeout=10)
    raise RuntimeError(f'model server did not answer at {status_url} within {timeout} s')


def model_name_of(args):
    """The --model_name value in a list of flags, or the default."""
    for arg in args:
        if arg.startswith('--model_name='):
            return arg.split('=', 1)[1]
    return 'mnist'


def drift_window(text):
    if not text.isascii() or not text.isdigit() or 0 < int(text) < 20:
        raise argparse.ArgumentTypeError(f'expected 0 (no drift monitor) or an integer >= 20, got {text!r}')
    return int(text)


def read_settings(args):
    """Turn parsed flags into ServerSettings, reading the configuration files; raises ConfigError."""
    if args.batching_parameters_file and not args.enable_batching:
        raise ConfigError('--batching_parameters_file is set with --enable_batching=false')
    batching = None
    if args.enable_batching:
        batching = read_batching_parameters(args.batching_parameters_file) if args.batching_parameters_file \
            else BatchingParameters()
    metrics_path = read_monitoring_config(args.monitoring_config_file) if args.monitoring_config_file else None
    if args.max_body_memory_bytes - args.small_body_reserve_bytes < args.max_request_bytes:
        raise ConfigError(f'--max_body_memory_bytes ({args.max_body_memory_bytes}) less --small_body_reserve_bytes '
                          f'({args.small_body_reserve_bytes}) must be at least --max_request_bytes '
                          f'({args.max_request_bytes}), or a body of that size could never be read')
    limits = HttpLimits(max_connections=args.max_connections, header_timeout_seconds=args.header_timeout_seconds,
                        body_timeout_seconds=args.body_timeout_seconds, body_deadline_seconds=args.body_deadline_seconds,
                        shutdown_grace_seconds=args.shutdown_grace_seconds)
    return ServerSettings(args.host, args.rest_api_port, args.model_name, os.path.abspath(args.model_base_path),
                          args.file_system_poll_wait_seconds, args.max_request_bytes, args.max_body_memory_bytes,
                          args.small_body_reserve_bytes, args.max_image_pixels_per_request, args.access_log,
                          metrics_path, batching, args.tensorflow_inter_op_parallelism or DEFAULT_INTER_OP_THREADS,
                          args.tensorflow_intra_op_parallelism,
                          args.max_num_load_retries, args.load_retry_interval_micros / 1e6, limits,
                          drift_window=args.drift_window)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Serve SavedModel versions over TensorFlow Serving\'s REST API (flags named like '
                    'tensorflow_model_server).')
    parser.add_argument('--rest_api_port', type=port_number, default=8501,
                        help='port of the REST API; 0 picks a free one (default: 8501)')
    parser.add_argument('--host', default='127.0.0.1',
                        help='address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)')
    parser.add_argument('--model_name', default='mnist',
                        help='model name in the URLs /v1/models/NAME (default: mnist)')
    parser.add_argument('--model_base_path', default=DEFAULT_MODEL_BASE_PATH,
                        help='folder holding the integer version folders (default: the mnist_model/ folder '
                             'next to this script)')
    parser.add_argument('--file_system_poll_wait_seconds', type=non_negative_float, default=1.0,
                        help='seconds between looks for a new or removed version; 0 loads once at start and keeps '
                             'no standby (default: 1)')
    parser.add_argument('--max_num_load_retries', type=non_negative_int, default=5,
                        help='times a version that failed to load is tried again, --load_retry_interval_micros '
                             'apart; it is also tried again when its files change (default: 5)')
    parser.add_argument('--load_retry_interval_micros', type=non_negative_int, default=60_000_000,
                        help='microseconds between the retries of a version that failed to load (default: 60000000 '
                             '= 1 minute)')
    parser.add_argument('--max_request_bytes', type=positive_int, default=16 * 1024 * 1024,
                        help='largest request body accepted, in bytes, also after gzip decompression; larger ones '
                             'get HTTP 413 (default: 16777216 = 16 MiB)')
    parser.add_argument('--max_body_memory_bytes', type=positive_int, default=128 * 1024 * 1024,
                        help='request body bytes all connections may hold at a time; a body that would take more '
                             'is answered 503 before it is read (default: 134217728 = 128 MiB)')
    parser.add_argument('--small_body_reserve_bytes', type=non_negative_int, default=16 * 1024 * 1024,
                        help='the part of --max_body_memory_bytes that only bodies of at most 64 KiB (a one-row '
                             'predict is 3 KB) may use, so that large bodies never starve small predicts '
                             '(default: 16777216 = 16 MiB)')
    parser.add_argument('--max_image_pixels_per_request', type=positive_int, default=4096 * 4096,
                        help='pixels the PNG and JPEG images of one request may decode to in all (read from their '
                             'headers before decoding); more is answered 400 (default: 16777216, one 4096x4096 '
                             'image or 21 000 of 28x28)')
    parser.add_argument('--max_connections', type=positive_int, default=1024,
                        help='connections open at a time, lowered at start to the descriptor limit (ulimit -n) '
                             'less 64; one more is answered 503 and closed (default: 1024)')
    parser.add_argument('--header_timeout_seconds', type=positive_float, default=10.0,
                        help='total time a client has to send a request\'s head (request line and headers), and '
                             'to send its first request after connecting; then 408 and close (default: 10)')
    parser.add_argument('--body_timeout_seconds', type=positive_float, default=30.0,
                        help='longest time without any part of a request body arriving (then 408 and close), or '
                             'without the client reading any of its replies (then close) (default: 30)')
    parser.add_argument('--body_deadline_seconds', type=positive_float, default=60.0,
                        help='total time a client has to send a request body, however steadily it arrives; then '
                             '408 and close (default: 60)')
    parser.add_argument('--shutdown_grace_seconds', type=non_negative_float, default=10.0,
                        help='on SIGTERM or Ctrl-C, how long requests in flight may take to finish before the '
                             'server exits (default: 10)')
    parser.add_argument('--enable_batching', type=boolean, nargs='?', const=True, default=True,
                        help='merge concurrent predict requests into one signature call; unlike TF Serving on by '
                             'default, as it doubles the throughput of many clients and costs one client nothing '
                             '(default: true)')
    parser.add_argument('--batching_parameters_file', default='',
                        help='TF Serving BatchingParameters text file: max_batch_size, batch_timeout_micros, '
                             'max_enqueued_batches, num_batch_threads (default: 1000, 0, 10, 1)')
    parser.add_argument('--monitoring_config_file', default='',
                        help='TF Serving MonitoringConfig text file, e.g. prometheus_config { enable: true, '
                             'path: "/monitoring/prometheus/metrics" } (default: no metrics)')
    parser.add_argument('--drift_window', type=drift_window, default=200,
                        help='inputs (images) in the drift monitor\'s sliding window, at least 20; 0 turns the '
                             'monitor off (default: 200; see docs/monitoring.md)')
    parser.add_argument('--tensorflow_inter_op_parallelism', type=non_negative_int, default=0,
                        help='threads TensorFlow runs independent ops in; 0 picks the larger of 8 and the number of '
                             'CPUs, so that image decoding leaves threads free for small predicts (default: 0)')
    parser.add_argument('--tensorflow_intra_op_parallelism', type=non_negative_int, default=0,
                        help='threads one TensorFlow op may use; 0: one per CPU (default: 0)')
    parser.add_argument('--access_log', type=boolean, nargs='?', const=True, default=False,
                        help='write one line per request to stderr (default: false)')
    args = parser.parse_args(argv)
    # TensorFlow's C++ info lines and a Python-support notice would bury the log; errors still show.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    warnings.filterwarnings('ignore', category=FutureWarning, module='google')
    if '/' in args.model_name or ':' in args.model_name or not args.model_name:
        parser.error(f'--model_name must be non-empty without "/" or ":", got {args.model_name!r}')
    try:
        settings = read_settings(args)
    except ConfigError as error:
        log_line(f'error: {error}')
        return 1
    # From here on nothing written to stderr can block a request, even when nobody reads it.
    pump = StderrPump()
    try:
        return serve(settings)
    except KeyboardInterrupt:  # Ctrl-C while TensorFlow was still loading, before the signal handlers were set.
        log_line('Interrupted while starting')
        return 130
    finally:
        pump.close(timeout=2)


if __name__ == '__main__':
    sys.exit(main())
