"""Tests of mnist_model/model_server.py: TF Serving's REST API shapes, bad inputs, version swaps, start and stop.

The server runs as a real subprocess on a free loopback port, started once for the module on a folder with no version
yet; it then gets the small test model (conftest.py), and at the end a second version exported while clients
send requests. Also checks the command line, Ctrl-C, and the KServe manifest at its boundary (the fields KServe reads).

Example:
    python3 -m pytest -q tests/test_model_server.py
"""

import base64
import http.client
import io
import json
import os
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DATA = os.path.join(REPO, 'mnist_model', 'test_data')
MAX_REQUEST_BYTES = 200_000


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
def served(tmp_path_factory, model_base_dir, trained_steps):
    """One server for the module. It starts on a folder with no version yet (only folders it must ignore), records
    its answers, then gets version 1 (the small test model) the way an export writes it: complete under a temporary
    name, then renamed. The swap test at the end of this file adds version 2."""
    base = tmp_path_factory.mktemp('served') / 'mnist_model'
    for ignored in ('data', 'notes', '.tmp-20240101-half-written'):
        (base / ignored).mkdir(parents=True)
    (base / '.tmp-20240101-half-written' / 'saved_model.pb').write_bytes(b'not a model')
    log_path = base.parent / 'server.log'
    port = model_server.free_port()
    url = f'http://127.0.0.1:{port}/v1/models/mnist'
    with open(log_path, 'wb') as log_file:
        process = model_server.launch(str(base), port, [f'--max_request_bytes={MAX_REQUEST_BYTES}',
                                                        '--file_system_poll_wait_seconds=0.2'], log_file,
                                      wait_for_version=False)
    try:
        empty = {'log': log_path.read_text(), 'status': requests.get(url, timeout=10),
                 'predict': post(url + ':predict', {'instances': PIXELS})}
        shutil.copytree(os.path.join(model_base_dir, '1'), base / '.tmp-copy')
        os.rename(base / '.tmp-copy', base / '1')
        wait_for_status(url, [('1', 'AVAILABLE')])
        yield {'url': url, 'port': port, 'log': log_path, 'base': base, 'steps': trained_steps, 'empty': empty}
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    log = log_path.read_text()
    assert code == 0 and log.rstrip().endswith('Server stopped') and 'Traceback' not in log


def post(url, body, **kwargs):
    return requests.post(url, data=json.dumps(body), timeout=30, **kwargs)


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
    # A request line that is not HTTP gets http.server's answer (an HTTP/0.9-style bare body), as JSON.
    assert json.loads(raw_exchange(port, b'NONSENSE\r\n\r\n')) == {'error': "Bad request syntax ('NONSENSE')"}
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
    time.sleep(0.2)
    log = served['log'].read_text()
    for index in range(3):
        assert log.count(f'"GET /v1/models/mnist?probe={index} HTTP/1.1" 200') == 1
    assert log.count('"POST /v1/models/mnist:predict?probe=predict HTTP/1.1" 200') == 1
    assert 'Traceback' not in log


def test_new_version_swaps_in_under_load_without_failed_requests(served, exported_candidate):
    """mnist.promote writes version 2 while 4 clients send requests; none fails. Runs last among the tests that
    use the module's server (pytest keeps file order): the tests above expect version 1."""
    from conftest import promote_into

    failures, successes, stop = [], [], threading.Event()
    body = json.dumps({'instances': np.stack([read_digit(3)]).reshape(1, 784).tolist()}).encode()

    def send_requests():
        connection = http.client.HTTPConnection('127.0.0.1', served['port'], timeout=30)
        while not stop.is_set():
            try:
                connection.request('POST', '/v1/models/mnist:predict', body=body)
                reply = connection.getresponse()
                content = reply.read()
                (successes if reply.status == 200 else failures).append(content)
            except (OSError, http.client.HTTPException) as error:
                failures.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection('127.0.0.1', served['port'], timeout=30)
        connection.close()

    clients = [threading.Thread(target=send_requests) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        time.sleep(0.3)
        assert promote_into(exported_candidate, served['base']).model_version == 2
        wait_for_status(served['url'], [('2', 'AVAILABLE'), ('1', 'END')])
        during_swap = len(successes)
        time.sleep(0.3)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=30)
    assert failures == []
    assert len(successes) > during_swap > 0
    assert requests.get(served['url'] + '/versions/2/metadata', timeout=10).status_code == 200
    assert requests.get(served['url'] + '/versions/1/metadata', timeout=10).status_code == 404
    assert 'Serving version 2 of model mnist' in served['log'].read_text()


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
        result = run_cli(f'--model_base_path={tmp_path}', f'--rest_api_port={taken.getsockname()[1]}')
    assert result.returncode == 1 and 'cannot listen' in result.stderr and 'Traceback' not in result.stderr


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
