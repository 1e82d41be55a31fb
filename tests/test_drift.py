"""Tests of the drift monitor: the profile an export writes, the statistics and tests (mnist_model/drift.py), the
local model server's gauges and /monitoring/drift (serving_drift.py), and the cluster's monitor fed KServe payload
logger CloudEvents (drift_monitor.py), which must report the scores the server reports for the same requests.

Example:
    python3 -m pytest -q tests/test_drift.py
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import requests

import drift
import drift_shifts
import model_server
from conftest import PYTHON, REPO

METRICS_PATH = '/monitoring/prometheus/metrics'
MONITORING_CONFIG = os.path.join(REPO, 'mnist_model', 'monitoring.config')


def test_input_statistics_measure_ink_extent_position_slant_and_gray():
    square = np.zeros((28, 28))
    square[10:18, 10:18] = 255          # 8 x 8 white square, centre (13.5, 13.5)
    moved = np.roll(square, (6, 0), axis=(0, 1))
    soft = square * 0.5                 # every inked pixel mid-gray
    leaning = np.zeros((28, 28))
    for row in range(6, 22):            # a stroke whose top is further right: slant > 0
        leaning[row, 14 + (14 - row) // 2] = 255
    stats = drift.input_statistics(np.stack([square, moved, soft, leaning, np.zeros((28, 28))]).reshape(5, 784))
    assert stats['ink'][0] == pytest.approx(64 / 784)
    assert stats['height'][0] == 8 and stats['height'][2] == 0      # mid-gray is below the ink level
    assert stats['offset'][0] == pytest.approx(np.hypot(0.5, 0.5))
    assert stats['offset'][1] == pytest.approx(np.hypot(5.5, 0.5))
    assert stats['gray'][0] == 0 and stats['gray'][2] == 1
    assert stats['slant'][3] > 0.3 and abs(stats['slant'][0]) < 1e-9
    assert [stats[name][4] for name in drift.INPUT_SIGNALS] == [0, 0, 0, 0, 0]   # an empty image is not an error


def test_tests_score_the_same_distribution_low_and_a_shifted_one_high():
    rng = np.random.default_rng(0)
    reference = np.sort(rng.normal(0, 1, 2000))
    assert drift.ks_score(rng.normal(0, 1, 200), reference) < 2
    assert drift.ks_score(rng.normal(0.6, 1, 200), reference) > 6
    counts = np.full(10, 1000.0)
    assert drift.chi_square_score(rng.integers(0, 10, 200), counts) < 2
    assert drift.chi_square_score(np.r_[np.zeros(100), rng.integers(0, 10, 100)], counts) > 20
    # The KS p-value agrees with scipy's exact two-sample test.
    from scipy import stats
    window = rng.normal(0.3, 1, 200)
    exact = drift.score_of(stats.ks_2samp(window, reference, method='exact').pvalue)
    assert drift.ks_score(window, reference) == pytest.approx(exact, rel=0.05)


def reference_of(rng, size=2000):
    """A Reference like a profile's: digits uniform, each continuous signal standard normal."""
    section = {'digit_counts': [100] * 10,
               'samples': {name: np.sort(rng.normal(0, 1, size)).tolist() for name in drift.SIGNALS
                           if name != 'digit'}}
    return drift.Reference(section, 'test')


def fake_batch(rng, count, shift=0.0):
    """`count` inputs as (pixels, probabilities), with input_statistics replaced by normal values (see below)."""
    probabilities = rng.dirichlet(np.ones(10) * 0.1, count).astype(np.float32)
    return rng.normal(shift, 1, (count, 784)).astype(np.float32), probabilities


def test_monitor_alerts_once_when_a_signal_moves_and_ends_when_it_is_back(monkeypatch):
    # The statistics of each row are its first pixels, so that each signal's distribution is set by the test.
    monkeypatch.setattr(drift, 'input_statistics', lambda pixels: {
        name: np.asarray(pixels, dtype=np.float64)[:, index] for index, name in enumerate(drift.INPUT_SIGNALS)})
    rng = np.random.default_rng(1)
    monkeypatch.setattr(drift, 'output_statistics', lambda probabilities: {
        'digit': np.asarray(probabilities).argmax(axis=1).astype(np.float64),
        'confidence': rng.normal(0, 1, len(probabilities))})
    reference = reference_of(rng)
    lines = []
    monitor = drift.DriftMonitor('mnist', window=100, step=10, on_alert=lines.append)
    for _ in range(30):
        monitor.observe(3, 'serving_default', reference, *fake_batch(rng, 10))
    assert lines == [] and monitor.alert_of(3) is False
    for _ in range(10):
        monitor.observe(3, 'serving_default', reference, *fake_batch(rng, 10, shift=1.5))
    assert len(lines) == 1 and lines[0].startswith('drift alert started: model mnist version 3, signature '
                                                   'serving_default, after ')
    state = monitor.snapshot()['versions'][0]
    assert state['alert'] and state['alert_started']['signature'] == 'serving_default'
    assert state['signatures']['serving_default']['signals']['ink']['score'] >= 5
    assert state['signatures']['serving_default']['signals']['ink']['threshold'] == drift.THRESHOLDS['ink']
    for _ in range(30):
        monitor.observe(3, 'serving_default', reference, *fake_batch(rng, 10))
    assert len(lines) == 2 and lines[1].startswith('drift alert ended: model mnist version 3')
    monitor.forget(3)
    assert monitor.snapshot()['versions'] == []


def test_scores_depend_on_the_inputs_not_on_how_they_were_batched():
    rng = np.random.default_rng(2)
    with np.load(os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')) as data:
        pixels = data['x_test'][:700].reshape(-1, 784).astype(np.float32)
    probabilities = rng.dirichlet(np.ones(10), len(pixels)).astype(np.float32)
    reference = drift.Reference(drift.compute_section(pixels, probabilities), 'test')
    snapshots = []
    for sizes in ([1] * 700, [7, 93, 300, 1, 299], [700]):
        monitor = drift.DriftMonitor('mnist', window=200, step=20)
        start = 0
        for size in sizes:
            monitor.observe(1, 'serving_default', reference, pixels[start:start + size],
                            probabilities[start:start + size])
            start += size
        snapshots.append(monitor.snapshot())
    assert snapshots[0] == snapshots[1] == snapshots[2]
    assert snapshots[0]['versions'][0]['signatures']['serving_default']['inputs_seen'] == 700


def test_a_confident_model_watched_on_its_own_test_digits_scores_low(tmp_path):
    # A well-trained model gives many top-1 probabilities a hair under 1 (0.9999996 ...). Stored with fewer digits
    # than float32 has, they read back as 1.0 while the window holds the real values: the KS distance was the share
    # of such rows in every window of clean digits (a score of 4.8 for the demo's tuned model).
    rng = np.random.default_rng(3)
    count = 4000
    confidence = (1 - 10.0 ** -rng.uniform(5, 8, count)).astype(np.float32)
    probabilities = np.zeros((count, 10), dtype=np.float32)
    probabilities[np.arange(count), rng.integers(0, 10, count)] = confidence
    with np.load(os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')) as data:
        pixels = data['x_test'][:count].reshape(-1, 784)
    profile = drift.compute_profile(pixels, probabilities, image_digits=1)
    # The same profile as a version exported before float32 precision holds it: format 1, 6 significant digits.
    section = profile['signatures']['serving_default']
    old_profile = {'format': 1, 'signatures': {'serving_default': dict(section, samples={
        name: [float(f'{value:.6g}') for value in values] for name, values in section['samples'].items()})}}
    for folder, document in (('new', profile), ('old', old_profile)):
        drift.write_profile(str(tmp_path / folder), document)
        reference = drift.read_profile(str(tmp_path / folder))['serving_default']
        monitor = drift.DriftMonitor('mnist', window=400, step=400)
        highest = 0.0
        for start in range(0, count, 400):
            monitor.observe(1, 'serving_default', reference, pixels[start:start + 400],
                            probabilities[start:start + 400])
            signals = monitor.snapshot()['versions'][0]['signatures']['serving_default']['signals']
            highest = max(highest, signals['confidence']['score'])
        assert highest < 2.5, folder


def test_profile_errors_are_one_line(tmp_path):
    with pytest.raises(drift.ProfileError, match='no drift profile'):
        drift.read_profile(str(tmp_path))
    (tmp_path / 'assets.extra').mkdir()
    (tmp_path / 'assets.extra' / 'profile.json').write_text('{"format": 1, "signatures": {"x": {}}}')
    with pytest.raises(drift.ProfileError, match=r'\(x\): not a drift profile'):
        drift.read_profile(str(tmp_path))


def test_export_writes_both_signatures_profiles_and_image_pixels_is_what_predict_image_classifies(
        exported_candidate, small_data_path):
    import tensorflow as tf

    references = drift.read_profile(exported_candidate)
    assert set(references) == {'serving_default', 'predict_image'}
    with open(os.path.join(exported_candidate, drift.PROFILE_FILE)) as file:
        profile = json.load(file)
    assert profile['signatures']['serving_default']['examples'] == 1000       # the small data's test set
    assert profile['signatures']['predict_image']['examples'] == drift.IMAGE_REFERENCE_DIGITS
    assert 'image_digits_npz_base64' not in profile
    loaded = tf.saved_model.load(exported_candidate)
    with np.load(small_data_path) as data:
        digits = data['x_test'][:5]
    images = tf.constant([drift_shifts.png_bytes(digit) for digit in digits])
    pixels = loaded.signatures['image_pixels'](image_bytes=images)['pixels']
    assert pixels.shape == (5, 784) and 200 < float(tf.reduce_max(pixels)) <= 255
    through_pixels = loaded.signatures['serving_default'](pixels=pixels)['probabilities'].numpy()
    through_image = loaded.signatures['predict_image'](image_bytes=images)['probabilities'].numpy()
    np.testing.assert_allclose(through_pixels, through_image, atol=1e-6)


def predict_bodies(count_clean, shift, count_shifted, seed=0):
    """Single-input predict bodies: clean test digits then shifted ones, raw pixels, then the same as PNG."""
    with np.load(os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')) as data:
        digits = data['x_test'][np.random.default_rng(seed).permutation(10000)[:count_clean + count_shifted]]
    digits[count_clean:] = drift_shifts.apply_shift(shift, digits[count_clean:], seed=seed)
    raw = [{'instances': [digit.reshape(784).tolist()]} for digit in digits]
    images = [{'signature_name': 'predict_image', 'instances': [
        {'b64': base64.b64encode(drift_shifts.png_bytes(digit)).decode('ascii')}]} for digit in digits]
    return raw + images


def kserve_event_headers(event_id, event_type):
    """The headers KServe's payload logger sends (pkg/logger/worker.go: cloudevents sdk-go v2, binary mode)."""
    return {'Ce-Specversion': '1.0', 'Ce-Id': event_id, 'Ce-Source': 'http://localhost:9081/',
            'Ce-Type': event_type, 'Ce-Time': '2026-12-07T18:00:00.000000Z',
            'Ce-Inferenceservicename': 'mnist-model-server', 'Ce-Namespace': 'mnist-project',
            'Ce-Component': 'predictor', 'Ce-Endpoint': 'default', 'Ce-Metadata': '{}',
            'Content-Type': 'application/json'}


def start_monitor(base_path, log_file):
    port = model_server.free_port()
    process = subprocess.Popen([PYTHON, os.path.join(REPO, 'mnist_model', 'drift_monitor.py'), f'--port={port}',
                                f'--model_base_path={base_path}', '--drift_window=60'],
                               stdout=log_file, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + '/healthz', timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError('the drift monitor did not answer')


def wait_for_inputs(url, expected, timeout=60):
    """GET /monitoring/drift once every input sent has been processed (the monitor works in a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        state = requests.get(url + '/monitoring/drift', timeout=10).json()
        if (sum(state['inputs_seen'].values()) >= expected and state['queued_inputs'] == 0) \
                or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_server_and_kserve_logger_monitor_alert_on_rotated_digits_with_the_same_scores(tmp_path, model_base_dir):
    base = str(tmp_path / 'models')
    shutil.copytree(model_base_dir, base)
    bodies = predict_bodies(count_clean=100, shift='rotated', count_shifted=100)
    server_log = open(tmp_path / 'server.log', 'w+')
    server = model_server.launch(base, model_server.free_port(), [
        f'--monitoring_config_file={MONITORING_CONFIG}', '--drift_window=60'], log_file=server_log)
    monitor, monitor_url = start_monitor(base, open(tmp_path / 'monitor.log', 'w+'))
    try:
        server_url = f'http://127.0.0.1:{server.args[2].split("=")[1]}'
        with requests.Session() as session:
            for body in bodies:
                # What a client sends to KServe, and what KServe's logger then posts: the body as sent, the reply
                # as TF Serving wrote it, under one id.
                request_bytes = json.dumps(body).encode('utf-8')
                reply = session.post(server_url + '/v1/models/mnist:predict', data=request_bytes, timeout=30)
                assert reply.status_code == 200, reply.text
                event_id = str(uuid.uuid4())
                for event_type, data in (('org.kubeflow.serving.inference.request', request_bytes),
                                         ('org.kubeflow.serving.inference.response', reply.content)):
                    answer = session.post(monitor_url + '/', data=data,
                                          headers=kserve_event_headers(event_id, event_type), timeout=30)
                    assert answer.status_code == 200, answer.text
        served_state = wait_for_inputs(server_url, len(bodies))
        monitor_state = wait_for_inputs(monitor_url, len(bodies))
        metrics = requests.get(server_url + METRICS_PATH, timeout=10).text
        monitor_metrics = requests.get(monitor_url + '/metrics', timeout=10).text
        bad = requests.post(monitor_url + '/', data=b'{}', headers={'Content-Type': 'application/json'}, timeout=10)
    finally:
        for process in (server, monitor):
            process.terminate()
            process.wait(timeout=30)
    version = served_state['versions'][0]
    assert version['version'] == 1 and version['alert'] is True
    assert version['alert_started']['signature'] == 'serving_default'
    # The scores are computed at every 50th input: at 100 the window holds clean digits only.
    assert 100 < version['alert_started']['after_inputs'] <= 200
    for signature in ('serving_default', 'predict_image'):
        assert version['signatures'][signature]['inputs_seen'] == 200
        assert max(signal['score'] for signal in version['signatures'][signature]['signals'].values()) >= 5
    assert monitor_state['versions'] == served_state['versions']
    assert 'model_drift_alert{model_name="mnist",version="1"} 1.0' in metrics
    assert 'model_drift_alert{model_name="mnist",version="1"} 1.0' in monitor_metrics
    assert 'model_drift_events_total{kind="predict",outcome="observed"} 400.0' in monitor_metrics
    assert bad.status_code == 400 and 'ce-specversion' in bad.json()['error']
    server_log.seek(0)
    alert_lines = [line for line in server_log.read().splitlines() if 'drift alert' in line]
    assert len(alert_lines) == 1 and alert_lines[0].startswith('drift alert started: model mnist version 1')


def test_a_version_without_a_profile_is_served_and_listed_as_not_watched(tmp_path, model_base_dir):
    base = tmp_path / 'models'
    shutil.copytree(model_base_dir, base)
    os.remove(base / '1' / drift.PROFILE_FILE)
    server = model_server.launch(str(base), model_server.free_port(), ['--drift_window=20'])
    try:
        url = f'http://127.0.0.1:{server.args[2].split("=")[1]}'
        reply = requests.post(url + '/v1/models/mnist:predict', json={'instances': [[0.0] * 784]}, timeout=30)
        assert reply.status_code == 200
        state = wait_for_inputs(url, 1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert state['versions'] == [] and state['inputs_seen'] == {'1/serving_default': 1}
    assert 'no drift profile' in state['versions_not_watched']['1']


def test_monitor_command_line_errors_are_one_line(tmp_path):
    result = subprocess.run([PYTHON, os.path.join(REPO, 'mnist_model', 'drift_monitor.py'),
                             f'--model_base_path={tmp_path / "missing"}', '--port=0'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0
    assert 'is not a folder' in result.stderr
    result = subprocess.run([PYTHON, os.path.join(REPO, 'mnist_model', 'model_server.py'), '--drift_window=5'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'expected 0 (no drift monitor) or an integer >= 20' in result.stderr


def test_monitor_reads_binary_and_structured_cloudevents_and_refuses_others():
    import drift_monitor

    headers = {name.lower(): value for name, value in kserve_event_headers('id-1', drift_monitor.REQUEST_TYPE).items()}
    assert drift_monitor.read_event(headers, b'{"instances": []}') == ('id-1', drift_monitor.REQUEST_TYPE,
                                                                      b'{"instances": []}')
    structured = json.dumps({'specversion': '1.0', 'id': 'id-2', 'type': drift_monitor.RESPONSE_TYPE,
                             'source': 'x', 'data': {'predictions': []}}).encode('utf-8')
    event = drift_monitor.read_event({'content-type': 'application/cloudevents+json'}, structured)
    assert event[:2] == ('id-2', drift_monitor.RESPONSE_TYPE) and json.loads(event[2]) == {'predictions': []}
    for changed, message in (({'ce-type': 'dev.knative.other'}, 'is not org.kubeflow'),
                             ({'ce-specversion': '0.3'}, 'not a CloudEvent 1.0'), ({'ce-id': ''}, 'has no id')):
        with pytest.raises(drift_monitor.EventError, match=message):
            drift_monitor.read_event({**headers, **changed}, b'{}')
    # TF Serving's bodies in either format, as the logger passes them on.
    assert drift_monitor.read_predict_body(b'{"inputs": {"pixels": [[1, 2]]}}')[1]['pixels'].shape == (1, 2)
    signature, inputs = drift_monitor.read_predict_body(
        b'{"signature_name": "predict_image", "instances": [{"image_bytes": {"b64": "iVBO"}}]}')
    assert signature == 'predict_image' and inputs['image_bytes'][0] == base64.b64decode('iVBO')
    reply = drift_monitor.read_reply_body(b'{"outputs": {"digit": [3], "probabilities": [[0.1, 0, 0, 0.9, 0, 0, 0, '
                                          b'0, 0, 0]]}}')
    assert reply['probabilities'].shape == (1, 10)


def test_monitor_pairs_halves_in_either_order_and_counts_what_it_cannot_use(tmp_path):
    import drift_monitor

    (tmp_path / '3').mkdir()
    (tmp_path / '3' / 'saved_model.pb').write_bytes(b'')
    observed = []

    class Watcher:
        def observe(self, served, signature, inputs, outputs):
            observed.append((served.version, signature, inputs['pixels'].shape, outputs['probabilities'].shape))

    monitor = drift_monitor.EventMonitor(str(tmp_path), Watcher())
    request = json.dumps({'instances': [[0] * 784, [255] * 784]}).encode('utf-8')
    reply = json.dumps({'predictions': [{'digit': 0, 'probabilities': [1] + [0] * 9}] * 2}).encode('utf-8')
    monitor.receive('b', drift_monitor.RESPONSE_TYPE, reply)          # the response may come first
    monitor.receive('a', drift_monitor.REQUEST_TYPE, request)
    monitor.receive('b', drift_monitor.REQUEST_TYPE, request)
    monitor.receive('a', drift_monitor.RESPONSE_TYPE, reply)
    monitor.receive('c', drift_monitor.REQUEST_TYPE, request)
    monitor.receive('c', drift_monitor.RESPONSE_TYPE, b'{"predictions": [{"digit": 1}]}')
    assert observed == [(3, 'serving_default', (2, 784), (2, 10))] * 2
    assert monitor.counts['predict', 'observed'] == 2 and monitor.counts['predict', 'unreadable'] == 1
    assert not monitor.pending
