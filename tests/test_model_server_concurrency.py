"""Tests of mnist_model/model_server.py under concurrent requests: batching, and a server whose stderr nobody reads.

Two real server subprocesses on free loopback ports serve the small test model (conftest.py): one without batching,
started the way a careless script starts it (stderr a pipe that is never read, one access line per request), and
one whose batches hold at most 4 rows, so that 4 requests sent together make exactly one batch. The batching code
itself is also tested in this process with a stand-in for the signature call.

Example:
    python3 -m pytest -q tests/test_model_server_concurrency.py
"""

import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import threading

import numpy as np
import pytest
import requests
from PIL import Image

import model_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DATA = os.path.join(REPO, 'mnist_model', 'test_data')
METRICS_PATH = '/monitoring/prometheus/metrics'
# At most 4 rows per batch, and a batch that is not full waits up to 2 s for more: time enough for requests sent
# together to meet, however loaded the machine is.
BATCHING_PARAMETERS = '''
# TF Serving's text format, as for --batching_parameters_file there.
max_batch_size { value: 4 }
batch_timeout_micros { value: 2000000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 1 }
'''


def read_digit(number):
    """The shipped test digit <number>.png as a 28x28 uint8 array (white on black, as MNIST)."""
    return np.array(Image.open(os.path.join(TEST_DATA, f'{number}.png')).convert('L'))


def png_b64(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    return {'b64': base64.b64encode(buffer.getvalue()).decode('ascii')}


@pytest.fixture(scope='module')
def plain(model_base_dir):
    """A server without batching whose stderr is a pipe nobody reads, writing one access line per request."""
    port = model_server.free_port()
    process = model_server.launch(model_base_dir, port, ['--enable_batching=false', '--access_log',
                                                         '--file_system_poll_wait_seconds=0'], log_file=subprocess.PIPE)
    try:
        yield f'http://127.0.0.1:{port}/v1/models/mnist'
    finally:
        process.send_signal(signal.SIGTERM)
        # Shutting down must not hang on the full pipe either.
        assert process.wait(timeout=30) == 0


@pytest.fixture(scope='module')
def batching(model_base_dir, tmp_path_factory):
    """A server with the batching parameters above and Prometheus metrics; its log goes to a file."""
    folder = tmp_path_factory.mktemp('batching')
    (folder / 'batching.config').write_text(BATCHING_PARAMETERS)
    (folder / 'monitoring.config').write_text('prometheus_config { enable: true }\n')
    port = model_server.free_port()
    with open(folder / 'server.log', 'wb') as log_file:
        process = model_server.launch(model_base_dir, port, [
            '--enable_batching', f'--batching_parameters_file={folder / "batching.config"}',
            f'--monitoring_config_file={folder / "monitoring.config"}', '--file_system_poll_wait_seconds=0'], log_file)
    try:
        yield {'url': f'http://127.0.0.1:{port}/v1/models/mnist', 'metrics': f'http://127.0.0.1:{port}{METRICS_PATH}',
               'log': folder / 'server.log'}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_a_server_whose_stderr_nobody_reads_keeps_answering(plain):
    """5 000 access lines of about 70 bytes are over 5 times the 64 KiB a Linux pipe holds: a server that waited
    for its stderr would stop after about 900 requests."""
    port = int(re.search(r':(\d+)/', plain)[1])
    body = json.dumps({'instances': read_digit(7).reshape(1, 784).tolist()}).encode()
    answers = []

    def send_requests(count):
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        for _ in range(count):
            connection.request('POST', '/v1/models/mnist:predict', body=body)
            reply = connection.getresponse()
            answers.append((reply.status, json.loads(reply.read())['predictions'][0]['digit']))
        connection.close()

    clients = [threading.Thread(target=send_requests, args=(1250,)) for _ in range(4)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=120)
    assert len(answers) == 5000 and set(answers) == {(200, 7)}


def send_together(url, bodies):
    """POST every body at the same moment, each from its own thread; returns the replies in order."""
    replies = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(index):
        start.wait()
        replies[index] = requests.post(url, json=bodies[index], timeout=60)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return replies


def batch_calls(batching):
    """How many signature calls the batching server has made so far (TF Serving's wrapped_run_count)."""
    text = requests.get(batching['metrics'], timeout=10).text
    return float(re.search(r'^:tensorflow:serving:batching_session:wrapped_run_count (\S+)$', text, re.M)[1])


def test_batched_answers_equal_unbatched_ones(plain, batching):
    images = [read_digit(number).reshape(1, 784).tolist() for number in range(8)]
    calls_before = batch_calls(batching)
    batched = send_together(batching['url'] + ':predict', [{'instances': image} for image in images])
    # Eight requests of one row, in batches of at most four rows: fewer signature calls than requests.
    assert batch_calls(batching) - calls_before < 8
    unbatched = [requests.post(plain + ':predict', json={'instances': image}, timeout=30) for image in images]
    for one, other in zip(batched, unbatched):
        assert one.status_code == other.status_code == 200
        mine, theirs = one.json()['predictions'][0], other.json()['predictions'][0]
        assert mine['digit'] == theirs['digit']
        # Equal up to float32 rounding: the matrix product of one row adds in another order than that of several.
        np.testing.assert_allclose(mine['probabilities'], theirs['probabilities'], rtol=0, atol=1e-5)
    assert [reply.json()['predictions'][0]['digit'] for reply in batched] == list(range(8))


def test_a_request_that_fails_in_a_batch_fails_alone(batching):
    url = batching['url'] + ':predict'
    # Three pictures and one file that is not a picture: four rows, one batch, whose merged call fails.
    bodies = [{'signature_name': 'predict_image', 'instances': [png_b64(read_digit(number))]} for number in (1, 2, 3)]
    bodies.append({'signature_name': 'predict_image', 'instances': [{'b64': base64.b64encode(b'no').decode()}]})
    calls_before = batch_calls(batching)
    replies = send_together(url, bodies)
    assert [reply.status_code for reply in replies] == [200, 200, 200, 400]
    assert [reply.json()['predictions'][0]['digit'] for reply in replies[:3]] == [1, 2, 3]
    assert set(replies[3].json()) == {'error'}
    # One merged call that failed, then one call per request: more calls than requests.
    assert batch_calls(batching) - calls_before == 5
    # A request of the wrong shape is refused before it joins a batch; the others are answered.
    bodies = [{'instances': read_digit(number).reshape(1, 784).tolist()} for number in (4, 5, 6)]
    bodies.append({'instances': [[0] * 783]})
    replies = send_together(url, bodies)
    assert [reply.status_code for reply in replies] == [200, 200, 200, 400]
    assert [reply.json()['predictions'][0]['digit'] for reply in replies[:3]] == [4, 5, 6]
    assert 'shape [1, 783]' in replies[3].json()['error']


def test_batching_refuses_requests_larger_than_a_batch_and_logs_no_access_lines(batching):
    reply = requests.post(batching['url'] + ':predict', json={'instances': [[0] * 784] * 5}, timeout=30)
    assert reply.status_code == 400
    assert reply.json()['error'].startswith('Task size 5 is larger than maximum input batch size 4')
    # Without --access_log the log holds the start-up lines only.
    assert '"POST ' not in batching['log'].read_text()


@pytest.mark.parametrize('batch_threads, timeout_micros', [(1, 0), (2, 1000)])
def test_batcher_gives_every_request_its_own_rows_under_many_threads(monkeypatch, batch_threads, timeout_micros):
    """The Batcher itself, with a stand-in for the signature call that doubles its input and fails on negative
    numbers and, like TensorFlow, lets other threads run while it computes: 16 threads send requests of 1 to 3 rows,
    some failing; each gets exactly its own answer."""
    import random
    import time

    import serving_batching
    from serving_config import BatchingParameters

    batch_rows = []

    def double(function, arrays):
        batch_rows.append(len(arrays['x']))
        time.sleep(0.0002)
        if (arrays['x'] < 0).any():
            raise serving_batching.RequestError(400, 'negative input')
        return {'y': arrays['x'] * 2}

    class Served:
        signatures = {'double': object()}
        batchable = {'double': True}

    monkeypatch.setattr(serving_batching, 'call_signature', double)
    batcher = serving_batching.Batcher(BatchingParameters(max_batch_size=3, batch_timeout_micros=timeout_micros,
                                                          max_enqueued_batches=1000, num_batch_threads=batch_threads),
                                       metrics=None, model_name='mnist')
    wrong = []

    def client(seed):
        chance = random.Random(seed)
        for index in range(100):
            rows = np.full((chance.randint(1, 3), 2), seed * 1000 + index)
            failing = chance.random() < 0.05
            rows[0, 0] = -1 if failing else rows[0, 0]
            try:
                answer = batcher.run(Served, 'double', {'x': rows})['y']
                wrong.extend([] if not failing and np.array_equal(answer, rows * 2) else [(seed, index, answer)])
            except serving_batching.RequestError as error:
                wrong.extend([] if failing and error.message == 'negative input' else [(seed, index, error)])

    # Daemon threads with one deadline for all: a lost wake-up fails the test instead of hanging it.
    clients = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(16)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in clients:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in clients) and wrong == []
    # Requests were merged: fewer calls than requests despite the extra calls of failed batches.
    assert len(batch_rows) < 1600 and max(batch_rows) == 3
    assert batcher.queues == {} and batcher.leaders == 0
