"""Serve exported SavedModels over TensorFlow Serving's REST API, for laptops without TF Serving.

The notebook and any TF Serving REST client work unchanged against this server: the same URLs, request and reply
bodies and error shapes as `tensorflow_model_server --rest_api_port`. It loads `<model_base_path>/<integer version>/`
folders with `tf.saved_model.load` (the artefact TF Serving loads; no project code in the path), serves the largest
version, and polls the folder so a newly exported version replaces the old one without failing requests in flight.
Folders whose names are not integers (`.tmp-*` exports being written, `data/`, `test_data/`) are ignored; a version
that fails to load is logged and retried when its folder changes. If every version folder disappears, the last
loaded version stays in service (TF Serving would unload it).

Endpoints (NAME is --model_name, N an integer version; without /versions/N the served version is used):
    GET  /v1/models/NAME[/versions/N]             model status: {"model_version_status": [...]}
    GET  /v1/models/NAME[/versions/N]/metadata    signature_def of the SavedModel
    POST /v1/models/NAME[/versions/N]:predict     {"signature_name"?, "instances" | "inputs"} ->
                                                  {"predictions"} (row format) or {"outputs"} (columnar format)
    GET  / and /draw                              a page to draw a digit on and see what the model reads (draw.html)
Errors are {"error": "..."} with HTTP 400 (bad JSON, body or path), 404 (unknown model or version), 405 (wrong
method), 411 (no Content-Length) or 413 (body over --max_request_bytes). One access line per request goes to stderr.

Example:
    python3 mnist_model/model_server.py --rest_api_port=8501 --model_name=mnist
    curl -d '{"instances": [[0, 0, ..., 0]]}' http://127.0.0.1:8501/v1/models/mnist:predict   # 784 pixels 0-255
"""

import argparse
import base64
import binascii
import http.server
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings

import numpy as np

DEFAULT_MODEL_BASE_PATH = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SIGNATURE = 'serving_default'
# The drawing page, at paths TF Serving's REST API does not use.
DRAW_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'draw.html')
DRAW_PAGE_PATHS = ('/', '/draw')
# A client that stops sending in the middle of a request gets its connection closed after this long, so a slow or
# broken client never holds a server thread for ever.
CLIENT_TIMEOUT_SECONDS = 30
URL_PATTERN = re.compile(
    r'^/v1/models/(?P<name>[^/:]+)'
    r'(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?'
    r'(?P<suffix>/metadata|:[a-z]+)?$')


class RequestError(Exception):
    """An error answered to the client as {"error": message} with an HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class ServedVersion:
    """One loaded SavedModel version: its callable signatures, their specs, and the signature_def for metadata."""

    def __init__(self, version, path, loaded, signature_defs):
        self.version = version
        self.path = path
        # Keep the loaded object alive: the signature functions refer to its variables.
        self.loaded = loaded
        self.signatures = dict(loaded.signatures)
        self.input_specs = {name: function.structured_input_signature[1]
                            for name, function in self.signatures.items()}
        self.signature_defs = signature_defs


def list_versions(base_path):
    """Return the sorted integer versions under base_path that hold a saved_model.pb; other folders are ignored."""
    try:
        names = os.listdir(base_path)
    except OSError:
        return []
    versions = []
    for name in names:
        if name.isdigit() and os.path.isfile(os.path.join(base_path, name, 'saved_model.pb')):
            versions.append(int(name))
    return sorted(versions)


def read_signature_defs(saved_model_dir):
    """Return the SavedModel's signature_def map as TF Serving prints it in GET .../metadata."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, 'saved_model.pb'), 'rb') as proto_file:
        saved_model.ParseFromString(proto_file.read())
    meta_graph = saved_model.meta_graphs[0]
    return {name: json_format.MessageToDict(signature_def, preserving_proto_field_name=True,
                                            including_default_value_fields=True)
            for name, signature_def in meta_graph.signature_def.items()}


def load_version(base_path, version):
    """Load <base_path>/<version> completely (weights and signatures) and return it as a ServedVersion."""
    import tensorflow as tf

    path = os.path.join(base_path, str(version))
    loaded = tf.saved_model.load(path)
    served = ServedVersion(version, path, loaded, read_signature_defs(path))
    warm_up(served)
    return served


def warm_up(served):
    """Call each signature once (zeros for numbers, a small black PNG for strings), so that TensorFlow's first-call
    graph optimisation happens before the version is swapped in, not in a client's request."""
    import tensorflow as tf

    blank_png = tf.io.encode_png(tf.zeros([28, 28, 1], tf.uint8))
    for name, specs in served.input_specs.items():
        if any(spec.shape.rank is None for spec in specs.values()):
            continue
        examples = {}
        for input_name, spec in specs.items():
            shape = [1 if size is None else size for size in spec.shape.as_list()]
            examples[input_name] = tf.fill(shape, blank_png) if spec.dtype == tf.string else tf.zeros(shape, spec.dtype)
        try:
            served.signatures[name](**examples)
        except Exception:  # Warm-up is an optimisation only; real requests report real errors.
            pass


def log_line(message):
    """Write one line to stderr in a single call, so lines from concurrent threads never interleave."""
    sys.stderr.write(message + '\n')
    sys.stderr.flush()


def folder_stamp(path):
    """Modification times of a version folder and its variables/ folder, which change while files are copied in."""
    stamps = []
    for folder in (path, os.path.join(path, 'variables')):
        try:
            stamps.append(os.stat(folder).st_mtime_ns)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


class ModelRepository:
    """Holds the served version and swaps in newer ones found by polling the base path.

    Request handlers read `self.current` once and use that object to the end of the request; a swap only replaces
    the reference after the new version is fully loaded, so requests in flight finish on the version they started
    with and none fails during a swap.
    """

    def __init__(self, base_path, model_name):
        self.base_path = base_path
        self.model_name = model_name
        self.current = None
        # Versions that were served and then replaced, reported with state END like TF Serving does.
        self.retired = []
        # Versions that failed to load, with the folder's modification stamp then: retried once the folder changes
        # (a copy by hand that was still in progress), not on every poll.
        self.failed = {}
        self.stop_event = threading.Event()

    def refresh(self):
        """Load the largest version on disk if it is not the one being served. Returns True if it swapped."""
        versions = [version for version in list_versions(self.base_path)
                    if self.failed.get(version) != folder_stamp(os.path.join(self.base_path, str(version)))]
        if not versions:
            return False
        target = versions[-1]
        current = self.current
        if current is not None and current.version == target:
            return False
        started = time.perf_counter()
        try:
            served = load_version(self.base_path, target)
        except Exception as error:  # A broken export must not stop the server; it keeps serving what it has.
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            log_line(f'Failed to load version {target} of model {self.model_name}: {first_line}')
            self.failed[target] = folder_stamp(os.path.join(self.base_path, str(target)))
            return False
        self.current = served
        if current is not None:
            self.retired = [version for version in self.retired if version != current.version] + [current.version]
        self.retired = [version for version in self.retired if version != target]
        log_line(f'Serving version {target} of model {self.model_name} from {served.path} '
                 f'(loaded in {time.perf_counter() - started:.2f} s)')
        return True

    def poll(self, wait_seconds):
        """Refresh every wait_seconds until stop() is called."""
        while not self.stop_event.wait(wait_seconds):
            self.refresh()

    def stop(self):
        self.stop_event.set()

    def version_states(self):
        """Return [(version, state)] newest first, as GET /v1/models/NAME reports them."""
        states = [] if self.current is None else [(self.current.version, 'AVAILABLE')]
        states += [(version, 'END') for version in self.retired]
        return sorted(states, reverse=True)


def decode_strings(value):
    """Turn JSON strings and {"b64": ...} objects into bytes, keeping the nesting of lists."""
    if isinstance(value, list):
        return [decode_strings(item) for item in value]
    if isinstance(value, dict):
        if set(value) != {'b64'} or not isinstance(value['b64'], str):
            raise RequestError(400, 'a string value given as an object must be {"b64": "<base64 string>"}')
        try:
            return base64.b64decode(value['b64'], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, 'invalid base64 data in a {"b64": ...} value') from None
    if isinstance(value, str):
        return value.encode('utf-8')
    raise RequestError(400, f'expected a string or {{"b64": ...}} value, got {json.dumps(value)[:40]}')


def to_tensor(name, value, spec):
    """Convert one JSON input value to a tensor matching the signature's TensorSpec, or raise RequestError(400)."""
    import tensorflow as tf

    if spec.shape.rank is None:
        shape_text = 'any shape'
    else:
        shape_text = str([-1 if size is None else size for size in spec.shape.as_list()])
    if spec.dtype == tf.string:
        strings = decode_strings(value)
        try:
            array = np.array(strings, dtype=object)
        except ValueError:
            raise RequestError(400, f'input "{name}" is not a rectangular list of strings') from None
        if array.dtype != object or any(not isinstance(item, bytes) for item in array.ravel()):
            raise RequestError(400, f'input "{name}" is not a rectangular list of strings')
    else:
        try:
            array = np.asarray(value)
        except ValueError:
            raise RequestError(400, f'input "{name}" is not a rectangular list of numbers') from None
        # Only numbers are accepted: booleans, nulls and strings would be silently cast by numpy otherwise.
        allowed_kinds = 'iuf' if spec.dtype.is_floating else 'iu' if spec.dtype.is_integer else 'b'
        if array.dtype.kind not in allowed_kinds:
            raise RequestError(400, f'input "{name}" must hold {spec.dtype.name} values only')
        try:
            array = array.astype(spec.dtype.as_numpy_dtype, casting='unsafe')
        except (TypeError, ValueError, OverflowError):
            raise RequestError(400, f'input "{name}" does not fit dtype {spec.dtype.name}') from None
    if not spec.shape.is_compatible_with(array.shape):
        raise RequestError(400, f'input "{name}" has shape {list(array.shape)}, the signature expects {shape_text}')
    return tf.constant(array, dtype=spec.dtype)


def read_instances(instances, input_names):
    """Turn the row format ("instances": one value or one object per row) into {input name: batch value}."""
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, '"instances" must be a non-empty list with one entry per example')
    if all(isinstance(row, dict) and not set(row) == {'b64'} for row in instances):
        columns = {name: [] for name in input_names}
        for row in instances:
            if set(row) != set(input_names):
                raise RequestError(400, f'each instance must have exactly the inputs {sorted(input_names)}, '
                                        f'got {sorted(row)}')
            for name in input_names:
                columns[name].append(row[name])
        return columns
    if len(input_names) != 1:
        raise RequestError(400, f'this signature has several inputs {sorted(input_names)}: '
                                'send one object per instance')
    return {input_names[0]: instances}


def read_inputs(inputs, input_names):
    """Turn the columnar format ("inputs": one value or {input name: value}) into {input name: value}."""
    if isinstance(inputs, dict) and set(inputs) != {'b64'}:
        if set(inputs) != set(input_names):
            raise RequestError(400, f'"inputs" must have exactly the inputs {sorted(input_names)}, '
                                    f'got {sorted(inputs)}')
        return inputs
    if len(input_names) != 1:
        raise RequestError(400, f'this signature has several inputs {sorted(input_names)}: '
                                'send "inputs" as an object keyed by input name')
    return {input_names[0]: inputs}


def to_json_value(name, array):
    """Convert an output array to JSON values; string outputs named *_bytes go out as {"b64": ...} like TF Serving."""
    if array.dtype == object:
        if name.endswith('_bytes'):
            items = [{'b64': base64.b64encode(item).decode('ascii')} for item in array.ravel()]
        else:
            items = [item.decode('utf-8', errors='replace') for item in array.ravel()]
        return np.array(items, dtype=object).reshape(array.shape).tolist()
    if array.dtype == np.float32:
        # Print float32 values with the digits float32 holds (0.9428256, not 0.9428256154060364), as TF Serving does.
        return array.astype(str).astype(np.float64).tolist()
    return array.tolist()


def summarize_tf_error(error):
    """The one line of a TensorFlow error that says what was wrong, without graph node names and stack headers."""
    lines = [line.strip() for line in str(getattr(error, 'message', error)).splitlines()]
    noise = ('Graph execution error', 'Detected at node', '<stack traces', '[[', 'File "')
    useful = [line for line in lines if line and not line.startswith(noise)]
    return useful[-1][:300] if useful else type(error).__name__


def predict(served, body):
    """Run a :predict request body (already parsed JSON) on a ServedVersion and return the reply dict."""
    import tensorflow as tf

    if not isinstance(body, dict):
        raise RequestError(400, 'the request body must be a JSON object')
    signature_name = body.get('signature_name', DEFAULT_SIGNATURE)
    if not isinstance(signature_name, str):
        raise RequestError(400, '"signature_name" must be a string')
    if signature_name == '':
        signature_name = DEFAULT_SIGNATURE
    if signature_name not in served.signatures:
        raise RequestError(400, f'Serving signature name: "{signature_name}" not found in signature def '
                                f'(available: {", ".join(sorted(served.signatures))})')
    if ('instances' in body) == ('inputs' in body):
        raise RequestError(400, 'the request must contain exactly one of "instances" (row format) '
                                'or "inputs" (columnar format)')
    specs = served.input_specs[signature_name]
    input_names = sorted(specs)
    row_format = 'instances' in body
    if row_format:
        values = read_instances(body['instances'], input_names)
    else:
        values = read_inputs(body['inputs'], input_names)
    tensors = {name: to_tensor(name, values[name], specs[name]) for name in input_names}
    try:
        outputs = served.signatures[signature_name](**tensors)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
        raise RequestError(400, summarize_tf_error(error)) from None
    arrays = {name: tensor.numpy() for name, tensor in outputs.items()}
    output_names = sorted(arrays)
    if not row_format:
        if len(output_names) == 1:
            return {'outputs': to_json_value(output_names[0], arrays[output_names[0]])}
        return {'outputs': {name: to_json_value(name, arrays[name]) for name in output_names}}
    if len(output_names) == 1:
        return {'predictions': to_json_value(output_names[0], arrays[output_names[0]])}
    batch_sizes = {arrays[name].shape[0] if arrays[name].ndim else None for name in output_names}
    if len(batch_sizes) != 1 or None in batch_sizes:
        raise RequestError(400, 'the outputs of this signature differ in their 0-th dimension: '
                                'use the columnar format ("inputs")')
    columns = {name: to_json_value(name, arrays[name]) for name in output_names}
    return {'predictions': [{name: columns[name][row] for name in output_names}
                            for row in range(batch_sizes.pop())]}


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
    served = repository.current
    if served is None or (version is not None and served.version != version):
        request = f'Latest({repository.model_name})' if version is None \
            else f'Specific({repository.model_name}, {version})'
        raise RequestError(404, f'Servable not found for request: {request}')
    return served


def model_metadata(served, model_name):
    """Reply body of GET /v1/models/NAME[/versions/N]/metadata."""
    return {'model_spec': {'name': model_name, 'signature_name': '', 'version': str(served.version)},
            'metadata': {'signature_def': {'signature_def': served.signature_defs}}}


def draw_page(model_name):
    """The drawing page as UTF-8 bytes, with the served model's name filled in. Read at every request, so an edited
    page shows on reload."""
    import html

    with open(DRAW_PAGE, encoding='utf-8') as page:
        return page.read().replace('{{model_name}}', html.escape(model_name)).encode('utf-8')


def parse_path(path, model_name):
    """Split a request path into (suffix, version); raise RequestError for bad paths, other models or labels."""
    match = URL_PATTERN.match(path.split('?', 1)[0])
    if match is None:
        raise RequestError(400, f'Malformed request: {path[:200]}')
    if match['label'] is not None:
        raise RequestError(404, f'Unrecognized servable version label: {match["label"][:100]}')
    version = match['version']
    if version is not None:
        if not version.isdigit() or len(version) > 18:
            raise RequestError(400, f'Malformed request: version must be an integer, got "{version[:100]}"')
        version = int(version)
    suffix = match['suffix'] or ''
    if suffix not in ('', '/metadata', ':predict', ':classify', ':regress'):
        raise RequestError(400, f'Malformed request: {path[:200]}')
    if match['name'] != model_name:
        name = match['name'][:100]
        if suffix == '':
            raise RequestError(404, f'Could not find any versions of model {name}')
        request = f'Latest({name})' if version is None else f'Specific({name}, {version})'
        raise RequestError(404, f'Servable not found for request: {request}')
    return suffix, version


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST API on top of http.server; the server object carries the repository and limits."""

    protocol_version = 'HTTP/1.1'  # keep-alive, as clients that send many requests expect
    # Headers and body leave in two writes; with Nagle's algorithm on, the client's delayed ACK adds ~40 ms to each.
    disable_nagle_algorithm = True
    timeout = CLIENT_TIMEOUT_SECONDS
    server_version = 'mnist-model-server'
    error_content_type = 'application/json'

    def setup(self):
        super().setup()
        self.started = time.perf_counter()
        self.reply_status = 0
        self.reply_bytes = 0

    def send_json(self, status, body):
        payload = json.dumps(body).encode('utf-8')
        self.reply_status = status
        self.reply_bytes = len(payload)
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(payload)))
        if status == 405:
            self.send_header('Allow', 'POST' if ':' in self.path.rsplit('/', 1)[-1] else 'GET')
        if self.close_connection:
            self.send_header('Connection', 'close')
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(payload)

    def send_page(self, payload):
        """Send an HTML page that may load nothing from elsewhere: its policy allows its own inline script and
        style, data: images, and requests to this server only."""
        self.reply_status = 200
        self.reply_bytes = len(payload)
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(payload)))
        self.send_header('Content-Security-Policy', "default-src 'none'; script-src 'unsafe-inline'; "
                                                    "style-src 'unsafe-inline'; img-src data: blob:; "
                                                    "connect-src 'self'")
        self.send_header('Cache-Control', 'no-cache')
        self.end_headers()
        self.wfile.write(payload)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, oversized headers, ...) as JSON too."""
        self.close_connection = True
        self.send_json(code, {'error': message or self.responses.get(code, ('Error',))[0]})

    def log_request(self, code='-', size='-'):
        """Silence http.server's own line: handle() writes one access line with the status and duration."""

    def log_message(self, format, *args):  # noqa: A002 - the name is http.server's
        log_line(f'{self.client_address[0]} {format % args}')

    def handle_one_request(self):
        self.started = time.perf_counter()
        self.reply_status = 0
        try:
            super().handle_one_request()
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        if self.reply_status:
            elapsed_ms = (time.perf_counter() - self.started) * 1000
            log_line(f'{self.client_address[0]} "{self.requestline[:200]}" {self.reply_status} '
                     f'{self.reply_bytes} {elapsed_ms:.1f}ms')

    def read_body(self):
        """Read the request body within the size limit, or raise RequestError (411/413/400)."""
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            self.close_connection = True
            raise RequestError(411, 'chunked bodies are not supported: send a Content-Length header')
        length_text = self.headers.get('Content-Length')
        if length_text is None:
            self.close_connection = True
            raise RequestError(411, 'a POST request needs a Content-Length header')
        if not length_text.strip().isdigit():
            self.close_connection = True
            raise RequestError(400, 'invalid Content-Length header')
        length = int(length_text)
        if length > self.server.max_request_bytes:
            # Drop the body (up to a bound) rather than leave it unread: closing a socket with unread bytes resets
            # the connection, and the client would see a reset instead of this reply.
            self.close_connection = True
            self.discard(min(length, 4 * self.server.max_request_bytes))
            raise RequestError(413, f'request body of {length} bytes is over the limit of '
                                    f'{self.server.max_request_bytes} bytes (--max_request_bytes)')
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise RequestError(400, 'the request body is shorter than its Content-Length')
        return body

    def discard(self, length, chunk_bytes=1 << 16):
        while length > 0:
            chunk = self.rfile.read(min(chunk_bytes, length))
            if not chunk:
                return
            length -= len(chunk)

    def answer(self, method):
        """Route one request and send its reply; every failure becomes {"error": ...}."""
        repository = self.server.repository
        try:
            # Read the body first: an error answered before it would leave its bytes on the kept-alive connection.
            raw_body = self.read_body() if method == 'POST' else b''
            if method == 'GET' and self.path.split('?', 1)[0] in DRAW_PAGE_PATHS:
                self.send_page(draw_page(repository.model_name))
                return
            suffix, version = parse_path(self.path, repository.model_name)
            if method == 'GET':
                if suffix not in ('', '/metadata'):
                    raise RequestError(405, f'use POST for {suffix}')
                if suffix == '':
                    self.send_json(200, model_status(repository, version))
                else:
                    self.send_json(200, model_metadata(find_served(repository, version), repository.model_name))
                return
            if method != 'POST':
                raise RequestError(405, f'method {method} is not allowed here')
            if suffix in ('', '/metadata'):
                raise RequestError(405, 'use GET for model status and metadata')
            if suffix != ':predict':
                raise RequestError(400, f'{suffix} is not supported by this server: the SavedModel has predict '
                                        'signatures only, use :predict')
            served = find_served(repository, version)
            try:
                body = json.loads(raw_body)
            except (ValueError, RecursionError) as error:
                raise RequestError(400, f'JSON Parse error: {str(error)[:200]}') from None
            self.send_json(200, predict(served, body))
        except RequestError as error:
            self.send_json(error.status, {'error': error.message})
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as error:  # The server keeps answering whatever one request does.
            log_line(f'Internal error on {self.requestline[:200]}: {type(error).__name__}: {error}')
            self.close_connection = True
            self.send_json(500, {'error': f'internal server error: {type(error).__name__}'})

    def do_GET(self):
        self.answer('GET')

    def do_POST(self):
        self.answer('POST')

    def refuse_method(self):
        """Methods TF Serving's REST API does not use."""
        self.close_connection = True
        self.send_json(405, {'error': f'method {self.command} is not allowed: use GET or POST'})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = refuse_method


def create_server(host, port, repository, max_request_bytes):
    """Bind the threaded HTTP server; raises OSError if the address is in use."""
    server = http.server.ThreadingHTTPServer((host, port), RequestHandler)
    server.daemon_threads = True
    server.repository = repository
    server.max_request_bytes = max_request_bytes
    return server


def serve(host, port, model_name, model_base_path, poll_wait_seconds, max_request_bytes):
    """Load the newest version, serve until SIGINT/SIGTERM, and shut down cleanly. Returns the exit code."""
    if not os.path.isdir(model_base_path):
        log_line(f'error: model base path {model_base_path} is not a folder')
        return 1
    repository = ModelRepository(model_base_path, model_name)
    try:
        server = create_server(host, port, repository, max_request_bytes)
    except OSError as error:
        log_line(f'error: cannot listen on {host}:{port}: {error.strerror or error}')
        return 1
    import tensorflow  # noqa: F401 - imported here so the load time logged below is the model's alone
    repository.refresh()
    if not list_versions(model_base_path):
        log_line(f'No versions of servable {model_name} found under base path {model_base_path}. Did you forget '
                 f"to name your leaf directory as a number (eg. '/1/')? Export one with "
                 f'`python3 mnist_model/mnist.py`; until then status and predict requests answer 404.')
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda number, frame: stop.set())
    poller = None
    if poll_wait_seconds > 0:
        poller = threading.Thread(target=repository.poll, args=(poll_wait_seconds,), daemon=True)
        poller.start()
    server_thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.2}, daemon=True)
    server_thread.start()
    log_line(f'Serving model {model_name} over REST at http://{host}:{server.server_address[1]}'
             f'/v1/models/{model_name} (polling {model_base_path} every {poll_wait_seconds:g} s; Ctrl-C stops)')
    # Waiting in short slices keeps the main thread responsive to signals on every platform.
    while not stop.wait(0.5):
        pass
    log_line('Shutting down')
    repository.stop()
    server.shutdown()
    server.server_close()
    if poller is not None:
        poller.join(timeout=5)
    log_line('Server stopped')
    return 0


def free_port(host='127.0.0.1'):
    """Return a TCP port that is free on host right now (for tests and benchmarks that start a server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch(model_base_path, port, extra_args=(), log_file=None, wait_for_version=True, timeout=120):
    """Start this server as a subprocess and wait until it answers; returns the Popen object.

    Used by the tests and bench/serve_bench.py. With wait_for_version, waits until a version is AVAILABLE, else
    only until the REST API answers. Raises RuntimeError with the server's last log lines if it exits or times out.
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
                if reply.status == 200:
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
                        help='seconds between looks for a new version; 0 loads once at start (default: 1)')
    parser.add_argument('--max_request_bytes', type=positive_int, default=16 * 1024 * 1024,
                        help='largest request body accepted, in bytes; larger ones get HTTP 413 '
                             '(default: 16777216 = 16 MiB)')
    args = parser.parse_args(argv)
    # TensorFlow's C++ info lines and a Python-support notice would bury the access log; errors still show.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    warnings.filterwarnings('ignore', category=FutureWarning, module='google')
    if '/' in args.model_name or ':' in args.model_name or not args.model_name:
        parser.error(f'--model_name must be non-empty without "/" or ":", got {args.model_name!r}')
    try:
        return serve(args.host, args.rest_api_port, args.model_name, os.path.abspath(args.model_base_path),
                     args.file_system_poll_wait_seconds, args.max_request_bytes)
    except KeyboardInterrupt:  # Ctrl-C while TensorFlow was still loading, before the signal handlers were set.
        log_line('Interrupted while starting')
        return 130


if __name__ == '__main__':
    sys.exit(main())
