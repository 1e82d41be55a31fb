"""Tests of mnist_model/model_server.py: TF Serving's REST API shapes, bad inputs, HTTP bodies, metrics, version
swaps and rollback, start and stop.

The server runs as a real subprocess on a free loopback port, started once for the module on a folder with no version
yet; it then gets the small test model (conftest.py), and at the end a second version exported while clients
send requests, which is then retired again while they go on. Also checks the command line and its configuration
files, Ctrl-C, and the KServe manifest at its boundary (the fields KServe reads). Batching and a server whose stderr
nobody reads are in test_model_server_concurrency.py.

Example:
    python3 -m pytest -q tests/test_model_server.py
"""

import base64
import gzip
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

import model_server
from conftest import read_reply

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DATA = os.path.join(REPO, 'mnist_model', 'test_data')
MAX_REQUEST_BYTES = 200_000
METRICS_PATH = '/monitoring/prometheus/metrics'


def read_digit(number):
    """The shipped test digit <number>.png as a 28x28 uint8 array (white on black, as MNIST)."""
    return np.array(Image.open(os.path.join(TEST_DATA, f'{number}.png')).convert('L'))


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    return buffer.getvalue()


def b64(data):
    return {'b64': base64.b64encode(data).decode('ascii')}


@pytest.fixture(scope='module')
def served(tmp_path_factory, model_base_dir):
    """One server for the module. It starts on a folder with no version yet (only folders it must ignore), records
    its answers, then gets version 1 (the small test model) the way an export writes it: complete under a temporary
    name, then renamed. The swap test at the end of this file adds version 2."""
    base = tmp_path_factory.mktemp('served') / 'mnist_model'
    for ignored in ('data', 'notes', '.tmp-20240101-half-written'):
        (base / ignored).mkdir(parents=True)
    (base / '.tmp-20240101-half-written' / 'saved_model.pb').write_bytes(b'not a model')
    log_path = base.parent / 'server.log'
    # TF Serving's own example file, with its comma and colon before the brace.
    monitoring_config = base.parent / 'monitoring.config'
    monitoring_config.write_text('prometheus_config: {\n  enable: true,\n  path: "%s"\n}\n' % METRICS_PATH)
    port = model_server.free_port()
    url = f'http://127.0.0.1:{port}/v1/models/mnist'
    with open(log_path, 'wb') as log_file:
        process = model_server.launch(str(base), port, [f'--max_request_bytes={MAX_REQUEST_BYTES}', '--access_log',
                                                        '--file_system_poll_wait_seconds=0.2',
                                                        f'--monitoring_config_file={monitoring_config}'], log_file,
                                      wait_for_version=False)
    try:
        empty = {'log': wait_for_log(log_path, 'No versions of servable'), 'status': requests.get(url, timeout=10),
                 'predict': post(url + ':predict', {'instances': PIXELS})}
        shutil.copytree(os.path.join(model_base_dir, '1'), base / '.tmp-copy')
        os.rename(base / '.tmp-copy', base / '1')
        wait_for_status(url, [('1', 'AVAILABLE')])
        yield {'url': url, 'port': port, 'log': log_path, 'base': base, 'empty': empty,
               'metrics': f'http://127.0.0.1:{port}{METRICS_PATH}'}
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    log = log_path.read_text()
    assert code == 0 and log.rstrip().endswith('Server stopped') and 'Traceback' not in log


def post(url, body, **kwargs):
    return requests.post(url, data=json.dumps(body), timeout=30, **kwargs)


def wait_for_log(log_path, text, timeout=10):
    """The server's log once it holds text: a thread of the server writes its stderr, a moment after the fact."""
    deadline = time.monotonic() + timeout
    while text not in (log := log_path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


def test_starts_without_a_version_and_says_so(served):
    empty = served['empty']
    assert 'No versions of servable mnist found under base path' in empty['log']
    assert empty['status'].status_code == 404
    assert empty['status'].json() == {'error': 'Could not find any versions of model mnist'}
    assert empty['predict'].status_code == 404
    assert empty['predict'].json() == {'error': 'Servable not found for request: Latest(mnist)'}
    # The half-written .tmp-* folder and the other folders were never taken for versions.
    assert 'Failed to load' not in served['log'].read_text()


def test_model_status_has_tf_serving_shape(served):
    expected = {'model_version_status': [
        {'version': '1', 'state': 'AVAILABLE', 'status': {'error_code': 'OK', 'error_message': ''}}]}
    assert requests.get(served['url'], timeout=10).json() == expected
    assert requests.get(served['url'] + '/versions/1', timeout=10).json() == expected
    reply = requests.get(served['url'] + '/versions/2', timeout=10)
    assert reply.status_code == 404
    assert reply.json() == {'error': 'Could not find version 2 of model mnist'}


def test_metadata_shows_both_signatures(served):
    for path in ('/metadata', '/versions/1/metadata'):
        reply = requests.get(served['url'] + path, timeout=10).json()
        assert reply['model_spec'] == {'name': 'mnist', 'signature_name': '', 'version': '1'}
        signatures = reply['metadata']['signature_def']['signature_def']
        pixels = signatures['serving_default']['inputs']['pixels']
        assert pixels['dtype'] == 'DT_FLOAT'
        assert [dim['size'] for dim in pixels['tensor_shape']['dim']] == ['-1', '784']
        outputs = signatures['serving_default']['outputs']
        assert outputs['probabilities']['dtype'] == 'DT_FLOAT'
        assert [dim['size'] for dim in outputs['probabilities']['tensor_shape']['dim']] == ['-1', '10']
        assert outputs['digit']['dtype'] == 'DT_INT64'
        image_bytes = signatures['predict_image']['inputs']['image_bytes']
        assert image_bytes['dtype'] == 'DT_STRING'
        assert signatures['predict_image']['method_name'] == 'tensorflow/serving/predict'


def test_row_and_columnar_formats_agree_and_find_the_digits(served):
    images = np.stack([read_digit(number) for number in range(10)]).reshape(10, 784)
    row = post(served['url'] + ':predict', {'instances': images.tolist()})
    assert row.status_code == 200, row.text
    predictions = row.json()['predictions']
    assert len(predictions) == 10 and all(set(item) == {'digit', 'probabilities'} for item in predictions)
    digits = [item['digit'] for item in predictions]
    assert digits == list(range(10))
    for item in predictions:
        assert len(item['probabilities']) == 10
        assert abs(sum(item['probabilities']) - 1) < 1e-4
        assert int(np.argmax(item['probabilities'])) == item['digit']
    # The columnar format, the named-input row format and an explicit version give the same answers.
    columnar = post(served['url'] + '/versions/1:predict',
                    {'signature_name': 'serving_default', 'inputs': {'pixels': images.tolist()}}).json()
    assert columnar['outputs']['digit'] == digits
    np.testing.assert_allclose(columnar['outputs']['probabilities'],
                               [item['probabilities'] for item in predictions], atol=1e-6)
    unnamed = post(served['url'] + ':predict', {'inputs': images[:2].tolist()}).json()
    assert unnamed['outputs']['digit'] == digits[:2]
    named_rows = post(served['url'] + ':predict', {'instances': [{'pixels': row} for row in images[:3].tolist()]})
    assert [item['digit'] for item in named_rows.json()['predictions']] == digits[:3]
    # A reply too large to write in the event loop (over INLINE_REPLY_VALUES numbers) is written in a worker thread:
    # 400 small PNGs (the body stays under this server's --max_request_bytes) give the same answers.
    pictures = [b64(png_bytes(read_digit(number))) for number in range(10)] * 40
    many = post(served['url'] + ':predict', {'signature_name': 'predict_image', 'instances': pictures})
    assert many.status_code == 200, many.text
    assert [item['digit'] for item in many.json()['predictions']] == digits * 40


def test_png_bytes_give_the_same_digits_even_inverted_or_rgb(served):
    images = [read_digit(number) for number in range(10)]
    originals = post(served['url'] + ':predict', {'instances': np.stack(images).reshape(10, 784).tolist()})
    expected = [item['digit'] for item in originals.json()['predictions']]
    # Dark ink on light paper, and RGB copies of the same digits, as a user's scan would be.
    inverted = [png_bytes(255 - image) for image in images]
    rgb = [png_bytes(np.stack([image] * 3, axis=-1)) for image in images]
    for pictures in ([png_bytes(image) for image in images], inverted, rgb):
        reply = post(served['url'] + ':predict',
                     {'signature_name': 'predict_image', 'instances': [b64(picture) for picture in pictures]})
        assert reply.status_code == 200, reply.text
        assert [item['digit'] for item in reply.json()['predictions']] == expected
    columnar = post(served['url'] + ':predict',
                    {'signature_name': 'predict_image', 'inputs': {'image_bytes': [b64(inverted[3])]}})
    assert columnar.json()['outputs']['digit'] == [expected[3]]


def raw_exchange(port, payload, read_bytes=65536):
    """Send raw bytes on a fresh connection and return every byte of the reply."""
    with socket.create_connection(('127.0.0.1', port), timeout=30) as connection:
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        reply = b''
        while chunk := connection.recv(read_bytes):
            reply += chunk
    return reply


def raw_request(port, payload):
    """Send raw bytes on a fresh connection and return the status code and the JSON body of the reply."""
    head, _, body = raw_exchange(port, payload).partition(b'\r\n\r\n')
    return int(head.split()[1]), json.loads(body)


PIXELS = [[0] * 784]
BAD_REQUESTS = [
    # (name, method, path, body (bytes, or JSON-able), status, part of the error message)
    ('malformed JSON', 'POST', ':predict', b'{"instances": [', 400, 'JSON Parse error'),
    ('body not an object', 'POST', ':predict', [1, 2], 400, 'JSON object'),
    ('both formats', 'POST', ':predict', {'instances': PIXELS, 'inputs': PIXELS}, 400, 'exactly one of'),
    ('neither format', 'POST', ':predict', {'signature_name': 'serving_default'}, 400, 'exactly one of'),
    ('wrong shape', 'POST', ':predict', {'instances': [[0] * 783]}, 400, 'shape'),
    ('ragged rows', 'POST', ':predict', {'instances': [[0] * 784, [0] * 3]}, 400, 'rectangular'),
    ('strings for floats', 'POST', ':predict', {'instances': [['0'] * 784]}, 400, 'float32'),
    ('nulls for floats', 'POST', ':predict', {'instances': [[None] * 784]}, 400, 'float32'),
    ('empty instances', 'POST', ':predict', {'instances': []}, 400, 'non-empty'),
    ('unknown input name', 'POST', ':predict', {'inputs': {'image': PIXELS}}, 400, 'pixels'),
    ('unknown signature', 'POST', ':predict', {'signature_name': 'nope', 'instances': PIXELS}, 400,
     'Serving signature name: "nope" not found'),
    ('numbers for bytes', 'POST', ':predict', {'signature_name': 'predict_image', 'instances': [1]}, 400, 'string'),
    ('bad base64', 'POST', ':predict', {'signature_name': 'predict_image', 'instances': [{'b64': '%%%'}]}, 400,
     'base64'),
    ('not an image', 'POST', ':predict',
     {'signature_name': 'predict_image', 'instances': [b64(b'hello, not a picture')]}, 400, ''),
    ('bad path', 'GET', '/../../etc/passwd', None, 400, 'Malformed request'),
    ('bad version', 'GET', '/versions/abc', None, 400, 'integer'),
    ('version label', 'GET', '/labels/stable', None, 400, 'Unrecognized servable version label: stable'),
    ('version label predict', 'POST', '/labels/canary:predict', {'instances': PIXELS}, 400,
     'Unrecognized servable version label: canary'),
    ('classify', 'POST', ':classify', {'examples': []}, 400, ':predict'),
    ('unknown model', 'POST', '-nope:predict', {'instances': PIXELS}, 404, 'Servable not found'),
    ('unknown model status', 'GET', '-nope', None, 404, 'Could not find any versions of model mnist-nope'),
    ('unknown version', 'POST', '/versions/9:predict', {'instances': PIXELS}, 404, 'Specific(mnist, 9)'),
    ('unknown version metadata', 'GET', '/versions/9/metadata', None, 404, 'Servable not found'),
    ('too large', 'POST', ':predict', {'instances': [[0] * 784] * 200}, 413, 'over the limit'),
    ('GET predict', 'GET', ':predict', None, 405, 'POST'),
    ('POST status', 'POST', '', {}, 405, 'GET'),
    ('DELETE', 'DELETE', '', None, 405, 'not allowed'),
]


@pytest.mark.parametrize('name, method, path, body, status, message', BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_an_error_and_the_server_keeps_answering(served, name, method, path, body, status,
                                                                  message):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    url = served['url'] + path
    if path.startswith('/../'):
        # requests would normalise the dots away; send the path as written.
        code, reply = raw_request(served['port'], f'GET /v1/models/mnist{path} HTTP/1.1\r\n'
                                                  'Host: x\r\n\r\n'.encode())
    else:
        answer = requests.request(method, url, data=data, timeout=30)
        code, reply = answer.status_code, answer.json()
    assert code == status
    assert set(reply) == {'error'} and message in reply['error']
    assert requests.get(served['url'], timeout=10).status_code == 200


def test_broken_http_gets_an_error_without_hanging_the_server(served):
    port = served['port']
    assert raw_request(port, b'POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n\r\n')[0] == 411
    # A body shorter than its Content-Length (the client gave up half-way).
    assert raw_request(port, b'POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n'
                             b'Content-Length: 500\r\n\r\n{"instances"')[0] == 400
    # A request line that is not HTTP gets a proper HTTP 400 with a status line, its error as JSON.
    assert raw_request(port, b'NONSENSE\r\n\r\n') == (400, {'error': 'Bad request: Invalid method encountered'})
    # Several requests on one kept-alive connection, an error reply in the middle.
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    for body, status in ((b'{}', 400), (json.dumps({'instances': PIXELS}).encode(), 200), (b'[', 400)):
        connection.request('POST', '/v1/models/mnist:predict', body=body)
        reply = connection.getresponse()
        assert reply.status == status
        reply.read()
    connection.close()
    assert requests.get(served['url'], timeout=10).status_code == 200


def test_one_access_log_line_per_request(served):
    for index in range(3):
        requests.get(served['url'] + f'?probe={index}', timeout=10)
    post(served['url'] + ':predict?probe=predict', {'instances': PIXELS})
    log = wait_for_log(served['log'], '"POST /v1/models/mnist:predict?probe=predict HTTP/1.1" 200')
    for index in range(3):
        assert log.count(f'"GET /v1/models/mnist?probe={index} HTTP/1.1" 200') == 1
    assert log.count('"POST /v1/models/mnist:predict?probe=predict HTTP/1.1" 200') == 1
    assert 'Traceback' not in log


def send_in_chunks(data, size=1000):
    """A generator: requests sends it with Transfer-Encoding: chunked, one chunk per item."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_gzip_and_chunked_bodies_answer_like_a_plain_one(served):
    url = served['url'] + ':predict'
    body = json.dumps({'instances': np.stack([read_digit(number) for number in range(10)]).reshape(10, 784).tolist()})
    body = body.encode()
    plain = requests.post(url, data=body, timeout=30)
    assert plain.status_code == 200
    gzip_header = {'Content-Encoding': 'gzip'}
    answers = {
        'gzip': requests.post(url, data=gzip.compress(body), headers=gzip_header, timeout=30),
        'chunked': requests.post(url, data=send_in_chunks(body), timeout=30),
        'gzip, chunked': requests.post(url, data=send_in_chunks(gzip.compress(body)), headers=gzip_header,
                                       timeout=30),
        'two gzip members': requests.post(url, data=gzip.compress(body[:500]) + gzip.compress(body[500:]),
                                          headers=gzip_header, timeout=30),
    }
    assert answers['chunked'].request.headers['Transfer-Encoding'] == 'chunked'
    for name, answer in answers.items():
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json() == plain.json(), name


def test_compressed_and_chunked_bodies_keep_the_size_limit(served):
    url = served['url'] + ':predict'
    gzip_header = {'Content-Encoding': 'gzip'}
    # A decompression bomb: a small body that inflates to 50 times the limit.
    bomb = gzip.compress(b' ' * (50 * MAX_REQUEST_BYTES))
    assert len(bomb) < MAX_REQUEST_BYTES
    cases = [
        (bomb, gzip_header, 413, 'decompresses to more than the limit'),
        (b'{"instances": [[0]]}', gzip_header, 400, 'cannot be decompressed'),
        (gzip.compress(json.dumps({'instances': PIXELS}).encode())[:-6], gzip_header, 400, 'truncated'),
        (b'{}', {'Content-Encoding': 'br'}, 415, 'Content-Encoding "br" is not supported'),
        (send_in_chunks(b' ' * (MAX_REQUEST_BYTES + 1), 50_000), {}, 413, 'over the limit'),
    ]
    for data, headers, status, message in cases:
        reply = requests.post(url, data=data, headers=headers, timeout=30)
        assert reply.status_code == status and message in reply.json()['error'], reply.text
    assert raw_request(served['port'], b'POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n'
                                       b'Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n')[0] == 400
    assert requests.get(served['url'], timeout=10).status_code == 200


def test_oversized_content_length_is_answered_at_once_then_the_connection_closes(served):
    for expect in ('', 'Expect: 100-continue\r\n'):
        with socket.create_connection(('127.0.0.1', served['port']), timeout=10) as connection:
            started = time.monotonic()
            # Only the headers of a 2 GiB body: the server must answer without waiting for (or reading) any of it.
            connection.sendall(f'POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n{expect}'
                               f'Content-Length: {2 ** 31}\r\n\r\n'.encode())
            status, headers, body = read_reply(connection)
            seconds = time.monotonic() - started
            assert status.split()[1] == '413' and 'over the limit' in json.loads(body)['error'] and seconds < 1
            assert headers['connection'] == 'close'
            # What the client still sends is read and dropped rather than answered with a reset; then it closes.
            connection.sendall(b'x' * 100_000)
            assert connection.recv(65536) == b''
    assert requests.get(served['url'], timeout=10).status_code == 200


def parse_metrics(text):
    """{(sample name, frozenset of label items): value} from Prometheus' text format."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            match = re.fullmatch(r'([^{\s]+)(?:\{(.*)\})? (\S+)', line)
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ''))
            samples[(match[1], labels)] = float(match[3])
    return samples


def metric(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_have_tf_serving_names_and_count_the_requests_made(served):
    before = parse_metrics(requests.get(served['metrics'], timeout=10).text)
    for _ in range(3):
        assert post(served['url'] + ':predict', {'instances': PIXELS}).status_code == 200
    assert post(served['url'] + ':predict', {'instances': [[0] * 783]}).status_code == 400
    assert requests.post(served['url'] + ':predict', data=b' ' * (MAX_REQUEST_BYTES + 1), timeout=30).status_code == 413
    assert requests.get(served['url'], timeout=10).status_code == 200
    assert requests.get(served['url'][:-5] + 'other', timeout=10).status_code == 404
    reply = requests.get(served['metrics'], timeout=10)
    assert reply.status_code == 200 and reply.headers['Content-Type'].startswith('text/plain; version=0.0.4')
    after = parse_metrics(reply.text)

    def increase(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert increase(':tensorflow:serving:request_count', model_name='mnist', status='OK') == 4
    assert increase(':tensorflow:serving:request_count', model_name='mnist', status='INVALID_ARGUMENT') == 1
    assert increase(':tensorflow:serving:request_count', model_name='mnist', status='RESOURCE_EXHAUSTED') == 1
    # Names the server does not serve are counted under one fixed label value (see test_model_server_http.py).
    assert increase(':tensorflow:serving:request_count', model_name='<unknown>', status='NOT_FOUND') == 1
    predict = {'model_name': 'mnist', 'API': 'predict', 'entrypoint': 'REST'}
    assert increase(':tensorflow:serving:request_latency_count', **predict) == 3
    assert increase(':tensorflow:serving:runtime_latency_count', model_name='mnist', API='Predict', runtime='TF1') == 3
    assert increase('model_server_predict_requests_total', model_name='mnist', signature_name='serving_default',
                    status='OK') == 3
    # TF Serving's buckets: 10 us * 1.8^i, printed with 6 significant digits.
    assert (':tensorflow:serving:request_latency_bucket', frozenset({**predict, 'le': '104.976'}.items())) in after
    assert '# TYPE :tensorflow:serving:request_latency histogram' in reply.text
    version_path = str(served['base'] / '1')
    assert metric(after, ':tensorflow:cc:saved_model:load_attempt_count', model_path=version_path,
                  status='success') == 1
    assert metric(after, ':tensorflow:cc:saved_model:load_latency', model_path=version_path) > 0
    assert metric(after, 'model_server_serving_version', model_name='mnist') == 1
    assert metric(after, 'model_server_loaded_version', model_name='mnist', version='1', role='serving') == 1


class SendingClients:
    """Clients that each send single-image predicts on a kept-alive connection until the `with` block ends."""

    def __init__(self, port, clients=4):
        self.port = port
        self.body = json.dumps({'instances': read_digit(3).reshape(1, 784).tolist()}).encode()
        self.failures, self.successes, self.stop = [], [], threading.Event()
        self.threads = [threading.Thread(target=self.send_requests) for _ in range(clients)]

    def send_requests(self):
        connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
        while not self.stop.is_set():
            try:
                connection.request('POST', '/v1/models/mnist:predict', body=self.body)
                reply = connection.getresponse()
                content = reply.read()
                (self.successes if reply.status == 200 else self.failures).append(content)
            except (OSError, http.client.HTTPException) as error:
                self.failures.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
        connection.close()

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exception):
        time.sleep(0.3)
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_new_version_swaps_in_under_load_without_failed_requests(served, exported_candidate):
    """promote writes version 2 (the same model, forced past the gate) while 4 clients send requests; none fails. Version 1 stays loaded as the
    standby and answers requests that name it, as TF Serving's latest{num_versions: 2} policy does. Runs after
    the tests above, which expect version 1 alone (pytest keeps file order)."""
    from conftest import promote_into

    with SendingClients(served['port']) as clients:
        assert promote_into(exported_candidate, served['base'], force_export=True).model_version == 2
        wait_for_status(served['url'], [('2', 'AVAILABLE'), ('1', 'AVAILABLE')])
        during_swap = len(clients.successes)
    assert clients.failures == []
    assert len(clients.successes) > during_swap > 0
    for number in (2, 1):
        assert requests.get(served['url'] + f'/versions/{number}/metadata', timeout=10).status_code == 200
    assert served_version(served['url']) == '2'
    assert 'Serving version 2 of model mnist' in wait_for_log(served['log'], 'Serving version 2 of model mnist')


def served_version(url):
    """The version that answers requests naming no version, from the metadata it returns."""
    return requests.get(url + '/metadata', timeout=10).json()['model_spec']['version']


def test_retiring_the_served_version_rolls_back_at_once_without_failed_requests(served):
    """Version 2 is retired with the function behind `mnist.py --retire 2` (its folder renamed to a hidden name)
    while 4 clients send requests: the standby, version 1, answers at once, and no request fails. Runs after the
    swap test, which added version 2."""
    from promote import retire

    with SendingClients(served['port']) as clients:
        started = time.monotonic()
        assert retire(str(served['base']), 2)[1] == 1
        while served_version(served['url']) != '1' and time.monotonic() - started < 10:
            time.sleep(0.02)
        seconds = time.monotonic() - started
        during_switch = len(clients.successes)
    assert clients.failures == []
    assert len(clients.successes) > during_switch > 0
    assert seconds < 2, f'version 1 answered {seconds:.2f} s after version 2 was retired'
    wait_for_status(served['url'], [('2', 'END'), ('1', 'AVAILABLE')])
    assert requests.get(served['url'] + '/versions/2/metadata', timeout=10).status_code == 404
    log = wait_for_log(served['log'], 'Version 2 of model mnist left')
    assert 'serving version 1, which was loaded as the standby' in log
    samples = parse_metrics(requests.get(served['metrics'], timeout=10).text)
    assert metric(samples, 'model_server_version_switches_total', model_name='mnist', reason='version_removed') == 1
    assert metric(samples, 'model_server_serving_version', model_name='mnist') == 1


def wait_for_status(url, expected, timeout=60):
    """Wait until GET url lists exactly the expected [(version, state)]."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = requests.get(url, timeout=10)
        if reply.status_code == 200:
            states = [(item['version'], item['state']) for item in reply.json()['model_version_status']]
            if states == expected:
                return
        time.sleep(0.1)
    raise AssertionError(f'status never became {expected}: {reply.text}')


def run_cli(*args):
    return subprocess.run([sys.executable, model_server.__file__, *args], capture_output=True, text=True,
                          timeout=60)


def test_command_line_errors_are_one_line(tmp_path):
    result = run_cli('--rest_api_port=abc')
    assert result.returncode == 2 and 'expected a port' in result.stderr
    result = run_cli('--file_system_poll_wait_seconds=-1')
    assert result.returncode == 2
    result = run_cli(f'--model_base_path={tmp_path / "missing"}', '--rest_api_port=0')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith('error: model base path')
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(f'--model_base_path={tmp_path}', f'--rest_api_port={port}')
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f'error: port {port} is in use on 127.0.0.1: stop the other server or pass --rest_api_port=N '
        '(0 picks a free port)')


CONFIG_ERRORS = [
    # (flags, file content, part of the one-line error)
    (['--monitoring_config_file={file}'], 'prometheus_config { enable: true, port: 9090 }', 'no field named "port"'),
    (['--monitoring_config_file={file}'], 'prometheus_config { enable: true, path: "/v1/metrics" }', 'not with "/v1/"'),
    (['--monitoring_config_file={file}.missing'], '', 'cannot read it'),
    (['--enable_batching', '--batching_parameters_file={file}'], 'allowed_batch_sizes: 8',
     'no field named "allowed_batch_sizes"'),
    (['--enable_batching=true', '--batching_parameters_file={file}'], 'max_batch_size { value: 0 }',
     'max_batch_size must be >= 1'),
    (['--batching_parameters_file={file}'], 'max_batch_size: 8', 'Expected "{"'),
    (['--enable_batching=false', '--batching_parameters_file={file}'], 'max_batch_size { value: 8 }',
     'set with --enable_batching=false'),
]


@pytest.mark.parametrize('flags, content, message', CONFIG_ERRORS, ids=[case[2] for case in CONFIG_ERRORS])
def test_configuration_file_errors_are_one_line(tmp_path, flags, content, message):
    config = tmp_path / 'server.config'
    config.write_text(content)
    result = run_cli(f'--model_base_path={tmp_path}', *[flag.format(file=config) for flag in flags])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: --'), result.stderr
    assert message in lines[0]


def test_ctrl_c_stops_the_server_cleanly(tmp_path):
    port = model_server.free_port()
    log_path = tmp_path / 'server.log'
    with open(log_path, 'wb') as log_file:
        process = model_server.launch(str(tmp_path), port, [], log_file, wait_for_version=False)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    log = log_path.read_text()
    assert log.rstrip().endswith('Server stopped') and 'Traceback' not in log and 'KeyboardInterrupt' not in log


def test_version_listing_ignores_other_folders(tmp_path):
    for name in ('1', '12', '3', '.tmp-4', 'data', '5'):
        (tmp_path / name).mkdir()
    for name in ('1', '12', '3', '.tmp-4'):
        (tmp_path / name / 'saved_model.pb').write_bytes(b'')
    # 5 has no saved_model.pb yet (a copy in progress), so it is not a version yet.
    assert model_server.list_versions(str(tmp_path)) == [1, 3, 12]


def test_kserve_scrape_annotations_once_uncommented_match_the_shipped_monitoring_config():
    """The commented Prometheus lines of the manifest, uncommented, are valid and name the path TF Serving exposes
    with mnist_model/monitoring.config, which this server reads the same way."""
    import yaml

    import serving_config

    with open(os.path.join(REPO, 'mnist_model', 'kserve-inferenceservice.yaml')) as manifest_file:
        text = manifest_file.read()
    uncommented = re.sub(r'^(\s*)# (annotations:|  serving\.kserve|  prometheus\.kserve|args:)', r'\1\2', text,
                         flags=re.M)
    manifest = yaml.safe_load(uncommented)
    annotations = manifest['metadata']['annotations']
    assert annotations['serving.kserve.io/enable-prometheus-scraping'] == 'true'
    config_path = os.path.join(REPO, 'mnist_model', 'monitoring.config')
    assert annotations['prometheus.kserve.io/path'] == serving_config.read_monitoring_config(config_path)
    assert manifest['spec']['predictor']['tensorflow']['args'] == [
        '--monitoring_config_file=/mnt/models/monitoring.config']


def test_kserve_manifest_serves_the_export_folder_with_a_new_enough_runtime():
    import tensorflow as tf
    import yaml

    with open(os.path.join(REPO, 'mnist_model', 'kserve-inferenceservice.yaml')) as manifest_file:
        manifest = yaml.safe_load(manifest_file)
    assert manifest['apiVersion'] == 'serving.kserve.io/v1beta1' and manifest['kind'] == 'InferenceService'
    assert manifest['metadata']['name'] == 'mnist-model-server'
    predictor = manifest['spec']['predictor']['tensorflow']
    # The base folder that holds the version folders, as TF Serving's --model_base_path wants it.
    assert predictor['storageUri'] == 'pvc://<notebook-pvc>/mlops-demo/mnist_model'
    runtime = tuple(int(part) for part in predictor['runtimeVersion'].split('.'))
    trained = tuple(int(part) for part in tf.__version__.split('.')[:2])
    assert len(runtime) == 3 and runtime[:2] >= trained
