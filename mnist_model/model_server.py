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
    GET  / and /draw                              a page to draw a digit on and see what the model reads (draw.html)
Request bodies may be gzip-compressed (Content-Encoding: gzip) and sent chunked (Transfer-Encoding: chunked).
Concurrent predicts are merged into one signature call (serving_batching.py; on by default, unlike TF Serving:
--enable_batching=false turns it off). Per-request log lines are opt-in (--access_log), and stderr can never block
a request, even when nobody reads it (serving_log.py).
Errors are {"error": "..."} with HTTP 400 (bad JSON, body, path or version label), 404 (unknown model or version),
405 (wrong method), 411 (no length), 413 (body over --max_request_bytes, also once decompressed; answered at once),
415 (other compression), 501 (other transfer coding) or 503 (batch queue full). docs/serving.md has the details.

Example:
    python3 mnist_model/model_server.py --rest_api_port=8501 --model_name=mnist
    curl -d '{"instances": [[0, 0, ..., 0]]}' http://127.0.0.1:8501/v1/models/mnist:predict   # 784 pixels 0-255
"""

import argparse
import email.utils
import http.server
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import typing
import warnings
import zlib


from serving_batching import Batcher, DirectRunner
from serving_config import BatchingParameters, ConfigError, read_batching_parameters, read_monitoring_config
from serving_json import RequestError, encode_predict_reply, parse_json, read_predict_request
from serving_log import StderrPump, log_line
from serving_versions import ModelRepository, list_versions

DEFAULT_MODEL_BASE_PATH = os.path.dirname(os.path.abspath(__file__))
# The drawing page, at paths TF Serving's REST API does not use. It may load nothing from elsewhere: its policy
# allows its own inline script and style, data: images, and requests to this server only.
DRAW_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'draw.html')
DRAW_PAGE_PATHS = ('/', '/draw')
DRAW_PAGE_HEADERS = ("Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; "
                     "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'\r\n"
                     'Cache-Control: no-cache\r\n')
# A client that stops sending in the middle of a request gets its connection closed after this long, so a slow or
# broken client never holds a server thread for ever.
CLIENT_TIMEOUT_SECONDS = 30
# After refusing an oversized body, what the client still sends is read and dropped for at most this long (and until
# it pauses for LINGER_IDLE_SECONDS), so that closing does not reset the connection before it has read the 413.
LINGER_SECONDS = 5
LINGER_IDLE_SECONDS = 1
MAX_TRAILER_LINES = 100
URL_PATTERN = re.compile(
    r'^/v1/models/(?P<name>[^/:]+)'
    r'(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?'
    r'(?P<suffix>/metadata|:[a-z]+)?$')
CHUNK_SIZE_PATTERN = re.compile(rb'[0-9a-fA-F]{1,15}')


class ServerSettings(typing.NamedTuple):
    """Everything the command line sets, as values (see main() for their meaning)."""
    host: str = '127.0.0.1'
    port: int = 8501
    model_name: str = 'mnist'
    model_base_path: str = DEFAULT_MODEL_BASE_PATH
    poll_wait_seconds: float = 1.0
    max_request_bytes: int = 16 * 1024 * 1024
    access_log: bool = False
    metrics_path: typing.Optional[str] = None           # None: no Prometheus metrics
    batching: typing.Optional[object] = None            # serving_config.BatchingParameters, or None: no batching
    max_load_retries: int = 5
    load_retry_seconds: float = 60.0


def gunzip(data, limit):
    """Decompress a gzip body (one or more members) into at most `limit` bytes, or raise RequestError. Decompressing
    stops at the limit, so a small body that would inflate to gigabytes (a decompression bomb) costs no more than a
    body at the limit."""
    parts, size = [], 0
    while data:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            part = decompressor.decompress(data, limit + 1 - size)
        except zlib.error as error:
            raise RequestError(400, f'the gzip request body cannot be decompressed: {error}') from None
        size += len(part)
        if size > limit:
            raise RequestError(413, f'the gzip request body decompresses to more than the limit of {limit} bytes '
                                    '(--max_request_bytes)')
        if not decompressor.eof:
            raise RequestError(400, 'the gzip request body is truncated')
        parts.append(part)
        data = decompressor.unused_data
    return b''.join(parts)


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
        if not version.isdigit() or len(version) > 18:
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


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST API on top of http.server; the server object carries the repository and settings."""

    protocol_version = 'HTTP/1.1'  # keep-alive, as clients that send many requests expect
    # Headers and body leave in one write, but Nagle's algorithm would still hold back a reply's last segment.
    disable_nagle_algorithm = True
    timeout = CLIENT_TIMEOUT_SECONDS
    server_version = 'mnist-model-server'

    def handle_one_request(self):
        self.started = time.perf_counter()
        self.reply_status = 0
        self.reply_bytes = 0
        self.linger = False
        # Labels of the request in the metrics: TF Serving's model_name and API, and the predict signature.
        self.model_name = self.api = self.signature_name = ''
        self.counted = False
        try:
            super().handle_one_request()
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        if self.linger:
            self.linger_and_close()
        if self.reply_status:
            self.record()

    def record(self):
        """The request's access log line (with --access_log) and metrics (with --monitoring_config_file)."""
        seconds = time.perf_counter() - self.started
        if self.server.settings.access_log:
            log_line(f'{self.client_address[0]} "{self.requestline[:200]}" {self.reply_status} '
                     f'{self.reply_bytes} {seconds * 1000:.1f}ms')
        metrics = self.server.metrics
        if metrics is not None and self.counted:
            metrics.record_request(self.model_name, self.api, self.reply_status, seconds)
            if self.api == 'predict':
                metrics.record_predict(self.model_name, self.signature_name, self.reply_status)

    def send_reply(self, status, payload, content_type='application/json', extra_headers=''):
        """Send status line, headers and body in one write (http.server would take two, and more time)."""
        self.reply_status = status
        self.reply_bytes = len(payload)
        if self.request_version == 'HTTP/0.9':  # http.server's answer to a request line it cannot parse: no head
            self.wfile.write(payload)
            return
        if self.close_connection:
            extra_headers += 'Connection: close\r\n'
        head = (f'{self.protocol_version} {status} {self.responses.get(status, ("",))[0]}\r\n'
                f'Server: {self.server_version}\r\nDate: {self.server.http_date()}\r\n'
                f'Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n{extra_headers}\r\n')
        self.wfile.write(head.encode('latin-1') + (payload if self.command != 'HEAD' else b''))

    def send_json(self, status, body):
        extra = ''
        if status == 405:
            extra = f'Allow: {"POST" if ":" in self.path.rsplit("/", 1)[-1] else "GET"}\r\n'
        # The json module's layout, as before orjson answered predicts: clients may print these bodies as they are.
        self.send_reply(status, json.dumps(body).encode('utf-8'), extra_headers=extra)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, oversized headers, ...) as JSON too."""
        self.close_connection = True
        self.send_json(code, {'error': message or self.responses.get(code, ('Error',))[0]})

    def log_request(self, code='-', size='-'):
        """Silence http.server's own line: record() writes the access line with the status and duration."""

    def log_message(self, format, *args):  # noqa: A002 - the name is http.server's
        log_line(f'{self.client_address[0]} {format % args}')

    def handle_expect_100(self):
        """A client that asks before sending an oversized body gets the 413 at once instead of '100 Continue'."""
        length = self.headers.get('Content-Length', '').strip()
        if length.isdigit() and int(length) > self.server.settings.max_request_bytes:
            return True
        return super().handle_expect_100()

    def read_body(self):
        """Read the request body, unchunked and decompressed, within --max_request_bytes; or raise RequestError."""
        limit = self.server.settings.max_request_bytes
        transfer_encoding = self.headers.get('Transfer-Encoding')
        if transfer_encoding is not None:
            self.close_connection = True  # RFC 9112: after a Transfer-Encoding body the connection is not reused.
            codings = [coding.strip().lower() for coding in transfer_encoding.split(',') if coding.strip()]
            if codings != ['chunked']:
                raise RequestError(501, f'Transfer-Encoding "{transfer_encoding[:100]}" is not supported: send '
                                        'the body chunked or with a Content-Length')
            raw = self.read_chunked(limit)
        else:
            length_text = self.headers.get('Content-Length')
            if length_text is None:
                self.close_connection = True
                raise RequestError(411, 'a POST request needs a Content-Length header or a chunked body')
            if not length_text.strip().isdigit():
                self.close_connection = True
                raise RequestError(400, 'invalid Content-Length header')
            length = int(length_text)
            if length > limit:
                self.refuse_oversized(f'request body of {length} bytes is over the limit of {limit} bytes '
                                      '(--max_request_bytes)')
            raw = self.rfile.read(length)
            if len(raw) != length:
                self.close_connection = True
                raise RequestError(400, 'the request body is shorter than its Content-Length')
        encoding = self.headers.get('Content-Encoding', '').strip().lower()
        if encoding in ('', 'identity'):
            return raw
        if encoding in ('gzip', 'x-gzip'):
            return gunzip(raw, limit)
        raise RequestError(415, f'Content-Encoding "{encoding[:100]}" is not supported: send gzip or no encoding')

    def read_chunked(self, limit):
        """Read a Transfer-Encoding: chunked body of at most `limit` bytes, and its trailer lines."""
        parts, size = [], 0
        while True:
            line = self.rfile.readline(1024)
            size_text = line.split(b';', 1)[0].strip()
            if not line.endswith(b'\n') or not CHUNK_SIZE_PATTERN.fullmatch(size_text):
                raise RequestError(400, 'malformed chunked request body: bad chunk size line')
            chunk_size = int(size_text, 16)
            if chunk_size == 0:
                break
            if size + chunk_size > limit:
                self.refuse_oversized(f'chunked request body of more than {limit} bytes is over the limit '
                                      '(--max_request_bytes)')
            chunk = self.rfile.read(chunk_size)
            if len(chunk) != chunk_size or self.rfile.readline(3) not in (b'\r\n', b'\n'):
                raise RequestError(400, 'malformed chunked request body: a chunk is shorter than its size')
            parts.append(chunk)
            size += chunk_size
        for _ in range(MAX_TRAILER_LINES):
            if self.rfile.readline(65537) in (b'\r\n', b'\n', b''):
                return b''.join(parts)
        raise RequestError(400, 'malformed chunked request body: too many trailer lines')

    def refuse_oversized(self, message):
        """Answer 413 before reading the body; handle_one_request then lingers and closes the connection."""
        self.close_connection = True
        self.linger = True
        raise RequestError(413, message)

    def linger_and_close(self):
        """Send our end of the connection, then read and drop what the client still sends for a bounded time: closing
        with unread bytes would reset the connection, and the client could lose the reply it has not read yet."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(min(remaining, LINGER_IDLE_SECONDS))
                if not self.connection.recv(1 << 16):
                    break
        except OSError:  # Reset, or the client was quiet for LINGER_IDLE_SECONDS: done either way.
            pass

    def answer(self, method):
        """Route one request and send its reply; every failure becomes {"error": ...}."""
        # Other methods on a page's path are REST API requests, answered "Malformed request" as any path outside it.
        page = self.server.pages.get(self.path.split('?', 1)[0]) if method == 'GET' else None
        try:
            if page is not None:
                content_type, payload, headers = page()
                self.send_reply(200, payload, content_type, headers)
            else:
                self.counted = True
                self.send_reply(200, self.answer_api(method))
        except RequestError as error:
            self.send_json(error.status, {'error': error.message})
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as error:  # The server keeps answering whatever one request does.
            log_line(f'Internal error on {self.requestline[:200]}: {type(error).__name__}: {error}')
            self.close_connection = True
            self.send_json(500, {'error': f'internal server error: {type(error).__name__}'})

    def answer_api(self, method):
        """Answer a request to TF Serving's REST API (/v1/models/...); returns the JSON reply body."""
        repository = self.server.repository
        # The model name labels the request's metrics, whatever goes wrong later.
        match = URL_PATTERN.match(self.path.split('?', 1)[0])
        self.model_name = match['name'] if match else ''
        # Read the body first: an error answered before it would leave its bytes on the kept-alive connection.
        raw_body = self.read_body() if method == 'POST' else b''
        name, suffix, version = parse_path(self.path)
        check_model_name(name, suffix, version, repository.model_name)
        if method == 'GET':
            if suffix not in ('', '/metadata'):
                raise RequestError(405, f'use POST for {suffix}')
            if suffix == '':
                return json.dumps(model_status(repository, version)).encode('utf-8')
            return json.dumps(model_metadata(find_served(repository, version), repository.model_name)).encode('utf-8')
        if method != 'POST':
            raise RequestError(405, f'method {method} is not allowed here')
        if suffix in ('', '/metadata'):
            raise RequestError(405, 'use GET for model status and metadata')
        self.api = suffix[1:]
        if suffix != ':predict':
            raise RequestError(400, f'{suffix} is not supported by this server: the SavedModel has predict '
                                    'signatures only, use :predict')
        served = find_served(repository, version)
        request = read_predict_request(served, parse_json(raw_body))
        self.signature_name = request.signature_name
        outputs = self.server.runner.run(served, request.signature_name, request.arrays)
        return encode_predict_reply(outputs, request.row_format)

    def do_GET(self):
        self.answer('GET')

    def do_POST(self):
        self.answer('POST')

    def refuse_method(self):
        """Methods TF Serving's REST API does not use."""
        self.close_connection = True
        self.send_json(405, {'error': f'method {self.command} is not allowed: use GET or POST'})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = refuse_method


class ModelHTTPServer(http.server.ThreadingHTTPServer):
    """One thread per connection; carries what the handlers share."""

    daemon_threads = True

    def __init__(self, settings, repository, runner, metrics):
        super().__init__((settings.host, settings.port), RequestHandler)
        self.settings = settings
        self.repository = repository
        self.runner = runner
        self.metrics = metrics
        # Pages outside the REST API, by path: a function returning (content type, body bytes, extra header lines)
        # for GET.
        self.pages = {path: lambda: draw_page(settings.model_name) for path in DRAW_PAGE_PATHS}
        self.date_cache = (0, '')

    def http_date(self):
        """The Date header's value, formatted once per second."""
        now = int(time.time())
        if self.date_cache[0] != now:
            self.date_cache = (now, email.utils.formatdate(now, usegmt=True))
        return self.date_cache[1]


def serve(settings):
    """Load the newest version, serve until SIGINT/SIGTERM, and shut down cleanly. Returns the exit code."""
    if not os.path.isdir(settings.model_base_path):
        log_line(f'error: model base path {settings.model_base_path} is not a folder')
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
    runner = DirectRunner(metrics, settings.model_name) if settings.batching is None \
        else Batcher(settings.batching, metrics, settings.model_name)
    try:
        server = ModelHTTPServer(settings, repository, runner, metrics)
    except OSError as error:
        log_line(f'error: cannot listen on {settings.host}:{settings.port}: {error.strerror or error}')
        runner.stop()
        return 1
    if metrics is not None:
        from serving_monitoring import CONTENT_TYPE
        server.pages[settings.metrics_path] = lambda: (CONTENT_TYPE, metrics.exposition(), '')
    import tensorflow  # noqa: F401 - imported here so the load time logged below is the model's alone
    repository.refresh(load_standby=False)
    try:
        found = list_versions(settings.model_base_path)
    except OSError:
        found = None  # refresh() has logged why the folder cannot be listed; the poll keeps trying.
    if found == []:
        log_line(f'No versions of servable {settings.model_name} found under base path {settings.model_base_path}. '
                 f"Did you forget to name your leaf directory as a number (eg. '/1/')? Export one with "
                 f'`python3 mnist_model/mnist.py`; until then status and predict requests answer 404.')
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda number, frame: stop.set())
    poller = None
    if settings.poll_wait_seconds > 0:
        poller = threading.Thread(target=repository.poll, args=(settings.poll_wait_seconds,), daemon=True)
        poller.start()
    server_thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.2}, daemon=True)
    server_thread.start()
    address = f'http://{settings.host}:{server.server_address[1]}'
    log_line(f'Serving model {settings.model_name} over REST at {address}/v1/models/{settings.model_name} '
             f'(polling {settings.model_base_path} every {settings.poll_wait_seconds:g} s; '
             f'batching {describe_batching(settings.batching)}; Ctrl-C stops)')
    if settings.metrics_path is not None:
        log_line(f'Prometheus metrics at {address}{settings.metrics_path}')
    # Waiting in short slices keeps the main thread responsive to signals on every platform.
    while not stop.wait(0.5):
        pass
    log_line('Shutting down')
    repository.stop()
    server.shutdown()
    server.server_close()
    runner.stop()
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


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text!r}') from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text!r}')
    return value


def port_number(text):
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f'expected a port 0-65535, got {text!r}')
    return int(text)


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}')
    return int(text)


def non_negative_int(text):
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
    return int(text)


def boolean(text):
    """TF Serving's boolean flags: --flag, --flag=true or --flag=false."""
    if text.lower() in ('true', '1'):
        return True
    if text.lower() in ('false', '0'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def read_settings(args):
    """Turn parsed flags into ServerSettings, reading the configuration files; raises ConfigError."""
    if args.batching_parameters_file and not args.enable_batching:
        raise ConfigError('--batching_parameters_file is set with --enable_batching=false')
    batching = None
    if args.enable_batching:
        batching = read_batching_parameters(args.batching_parameters_file) if args.batching_parameters_file \
            else BatchingParameters()
    metrics_path = read_monitoring_config(args.monitoring_config_file) if args.monitoring_config_file else None
    return ServerSettings(args.host, args.rest_api_port, args.model_name, os.path.abspath(args.model_base_path),
                          args.file_system_poll_wait_seconds, args.max_request_bytes, args.access_log, metrics_path,
                          batching, args.max_num_load_retries, args.load_retry_interval_micros / 1e6)


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
