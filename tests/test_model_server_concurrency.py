"""Tests of mnist_model/model_server.py under concurrent requests: batching, and a server whose stderr nobody reads.

Two real server subprocesses on free loopback ports serve the small test model (conftest.py): one without batching,
started the way a careless script starts it (stderr a pipe that is never read, one access line per request), and
one whose batches hold at most 4 rows, so that 4 requests sent together make exactly one batch. The batching code
itself is also tested in this process, driven from an event loop as the server drives it, with a stand-in for
the signature call.

Example:
    python3 -m pytest -q tests/test_model_server_concurrency.py
"""

import asyncio
import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import threading
import time

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


class DoublingSignature:
    """A stand-in for a served version and its signature call (serving_batching.call_signature), which doubles its
    input and fails on negative numbers; like TensorFlow, it lets other threads run while it computes, and it can be
    held until `release` is set. `batch_rows` records the rows of every call."""

    batchable = {'double': True}

    def __init__(self, seconds=0.0002):
        self.callers = {'double': self}
        self.seconds = seconds
        self.batch_rows = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, function, arrays):
        import serving_batching

        assert function is self
        self.batch_rows.append(len(arrays['x']))
        self.release.wait(timeout=30)
        time.sleep(self.seconds)
        if (arrays['x'] < 0).any():
            raise serving_batching.RequestError(400, 'negative input')
        return {'y': arrays['x'] * 2}


def make_batcher(monkeypatch, served, **parameters):
    import serving_batching
    from serving_config import BatchingParameters

    monkeypatch.setattr(serving_batching, 'call_signature', served)
    return serving_batching.Batcher(BatchingParameters(**parameters), metrics=None, model_name='mnist', pool=None)


@pytest.mark.parametrize('batch_threads, timeout_micros', [(1, 0), (2, 0), (2, 1000)])
def test_batcher_gives_every_request_its_own_rows_under_many_concurrent_requests(monkeypatch, batch_threads,
                                                                                 timeout_micros):
    """The Batcher itself, driven from an event loop as the server drives it: 16 clients send 100 requests each, of
    1 to 3 rows, some failing, some marked as alone in the server (which may run them in the loop); each gets
    exactly its own answer, and requests are merged into fewer calls."""
    import random

    import serving_batching

    served = DoublingSignature()
    batcher = make_batcher(monkeypatch, served, max_batch_size=3, batch_timeout_micros=timeout_micros,
                           max_enqueued_batches=1000, num_batch_threads=batch_threads)
    wrong = []

    async def client(seed):
        chance = random.Random(seed)
        for index in range(100):
            rows = np.full((chance.randint(1, 3), 2), seed * 1000 + index)
            failing = chance.random() < 0.05
            rows[0, 0] = -1 if failing else rows[0, 0]
            try:
                answer = (await batcher.run(served, 'double', {'x': rows}, alone=chance.random() < 0.1))['y']
                wrong.extend([] if not failing and np.array_equal(answer, rows * 2) else [(seed, index, answer)])
            except serving_batching.RequestError as error:
                wrong.extend([] if failing and error.message == 'negative input' else [(seed, index, error)])
            # Clients arrive at different moments, as over HTTP.
            await asyncio.sleep(chance.random() * 0.0005)

    async def all_clients():
        # One deadline for all: a lost wake-up fails the test instead of hanging it.
        await asyncio.wait_for(asyncio.gather(*[client(seed) for seed in range(16)]), timeout=60)

    try:
        asyncio.run(all_clients())
    finally:
        batcher.close()
    assert wrong == []
    # Requests were merged: fewer calls than requests despite the extra calls of failed batches.
    assert len(served.batch_rows) < 1600 and max(served.batch_rows) == 3
    assert batcher.queues == {} and batcher.running == 0 and batcher.timers == {}


def test_batcher_limits_hold_while_a_batch_runs(monkeypatch):
    """At most max_batch_size rows per request (400), at most max_enqueued_batches batches waiting (503), one batch
    at a time with num_batch_threads 1, and what queued while a batch ran is the next batch."""
    import serving_batching

    served = DoublingSignature()
    batcher = make_batcher(monkeypatch, served, max_batch_size=2, batch_timeout_micros=0, max_enqueued_batches=2,
                           num_batch_threads=1)

    async def scenario():
        served.release.clear()
        first = asyncio.ensure_future(batcher.run(served, 'double', {'x': np.full((1, 2), 1)}))
        await asyncio.sleep(0.05)
        assert batcher.running == 1 and served.batch_rows == [1]
        # Four rows wait: two batches, the most that may wait; one more row would make a third.
        queued = [asyncio.ensure_future(batcher.run(served, 'double', {'x': np.full((1, 2), 10 + index)}))
                  for index in range(4)]
        await asyncio.sleep(0.05)
        assert served.batch_rows == [1] and batcher.queued_rows
        with pytest.raises(serving_batching.RequestError) as full:
            await batcher.run(served, 'double', {'x': np.full((1, 2), 99)})
        assert full.value.status == 503
        with pytest.raises(serving_batching.RequestError) as too_large:
            await batcher.run(served, 'double', {'x': np.full((3, 2), 99)})
        assert too_large.value.status == 400 and 'Task size 3 is larger' in too_large.value.message
        served.release.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *queued), timeout=30)
        return [answer['y'][0, 0] for answer in answers]

    try:
        assert asyncio.run(scenario()) == [2, 20, 22, 24, 26]
    finally:
        served.release.set()  # a failed assertion must not leave the batch thread held
        batcher.close()
    assert served.batch_rows == [1, 2, 2]


def test_batcher_waits_batch_timeout_for_a_batch_that_is_not_full(monkeypatch):
    """A batch that is not full waits batch_timeout_micros for more requests (here 1 s), and one that is full goes at
    once; both answer every request with its own rows."""
    served = DoublingSignature(seconds=0)
    batcher = make_batcher(monkeypatch, served, max_batch_size=4, batch_timeout_micros=1_000_000,
                           max_enqueued_batches=10, num_batch_threads=1)

    async def timed(count):
        started = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*[
            batcher.run(served, 'double', {'x': np.full((1, 2), index)}, alone=True) for index in range(count)]), 30)
        assert [answer['y'][0, 0] for answer in answers] == [2 * index for index in range(count)]
        return time.monotonic() - started

    try:
        waited_partial = asyncio.run(timed(2))
        waited_full = asyncio.run(timed(4))
    finally:
        batcher.close()
    assert waited_partial >= 0.95 and waited_full < 0.9
    assert served.batch_rows == [2, 4]
