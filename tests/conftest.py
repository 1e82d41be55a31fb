"""Shared fixtures: a small slice of the bundled data and one model exported from it, made once per test session."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import evaluate
import export
import load_data
import mnist
import promote
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
# Small layers and few steps: the tests check behaviour, the benchmarks check accuracy and speed.
TINY_HPARAMS = {'num_hidden_layer_1': 64, 'num_hidden_layer_2': 32, 'dropout': 1.0, 'learning_rate': 0.05,
                'epoch': 300, 'batch_size': 128, 'seed': 0}

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# A shell without job control starts background commands with SIGINT ignored, and the processes the tests start
# would inherit that and ignore the Ctrl-C the tests send them. A handled signal is reset to the default in a
# started program, as in a user's terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def browser_for(purpose):
    """A headless Chromium for a browser test (tests/page_driver.py); without one the test skips, and fails in CI."""
    import page_driver

    try:
        return page_driver.Browser()
    except (ImportError, LookupError) as error:
        reason = f'no browser to {purpose}: {error}'
        if os.environ.get('CI') == 'true':
            pytest.fail(reason)
        pytest.skip(reason)


def run_script(*args, cwd=REPO, timeout=300, env=None):
    """Run a Python script of the repository as a user would, returning the finished process."""
    return subprocess.run([PYTHON, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def read_reply(connection):
    """Read one HTTP reply from a socket: (status line, headers as a dict of lower-cased names and values, body
    bytes). Bytes of a next reply that arrive with it are dropped: read pipelined replies with read_replies."""
    return read_replies(connection, 1)[0]


def read_replies(connection, count):
    """Read `count` consecutive HTTP replies from a socket (pipelined replies may arrive in one piece), each as
    read_reply returns it."""
    replies, data = [], b''
    while len(replies) < count:
        head_end = data.find(b'\r\n\r\n')
        if head_end >= 0:
            lines = data[:head_end].decode('latin-1').split('\r\n')
            headers = dict(line.lower().split(': ', 1) for line in lines[1:])
            end = head_end + 4 + int(headers['content-length'])
            if len(data) >= end:
                replies.append((lines[0], headers, data[head_end + 4:end]))
                data = data[end:]
                continue
        chunk = connection.recv(1 << 20)
        assert chunk, f'connection closed after {len(replies)} full replies: {data[:200]!r}'
        data += chunk
    return replies


@pytest.fixture(scope='session')
def small_data_path(tmp_path_factory):
    """The first 3000 training and 1000 test examples of the bundled data, in the Keras npz layout."""
    path = tmp_path_factory.mktemp('data') / 'mnist-small.npz'
    with np.load(mnist.DEFAULT_DATA, allow_pickle=False) as full:
        np.savez(path, x_train=full['x_train'][:3000], y_train=full['y_train'][:3000],
                 x_test=full['x_test'][:1000], y_test=full['y_test'][:1000])
    return str(path)


@pytest.fixture(scope='session')
def trained_steps(tmp_path_factory, small_data_path):
    """The files of load_data -> train -> evaluate on the small data: dataset, model folder and metrics JSON."""
    work = tmp_path_factory.mktemp('steps')
    paths = {name: str(work / name) for name in ('dataset.npz', 'model', 'metrics.json',
                                                  'mlpipeline-metrics.json', 'mlpipeline-ui-metadata.json')}
    load_data.load_data(small_data_path, paths['dataset.npz'])
    SMALL_DATASET['path'] = paths['dataset.npz']
    train.train(paths['dataset.npz'], paths['model'], **TINY_HPARAMS)
    evaluate.evaluate(paths['dataset.npz'], paths['model'], paths['metrics.json'],
                      paths['mlpipeline-metrics.json'], paths['mlpipeline-ui-metadata.json'])
    return paths


@pytest.fixture(scope='session')
def exported_candidate(tmp_path_factory, trained_steps):
    """The small model exported as a candidate SavedModel folder (not yet a served version)."""
    export_dir = str(tmp_path_factory.mktemp('candidate') / 'export')
    export.export(trained_steps['model'], trained_steps['metrics.json'], export_dir)
    return export_dir


# The dataset npz of the small data that promote_into judges on, written once by the trained_steps fixture.
SMALL_DATASET = {}


def promote_into(candidate, serving_dir, **rule):
    """promote() the candidate into serving_dir, judged on the small data's test split, with its KFP outputs beside
    serving_dir; returns its outputs. (Any test that promotes has an exported model, so the dataset exists.)"""
    outputs = os.path.join(os.path.dirname(os.path.abspath(serving_dir)), 'promote-outputs')
    return promote.promote(candidate, SMALL_DATASET['path'], str(serving_dir), os.path.join(outputs, 'metrics.json'),
                           os.path.join(outputs, 'ui-metadata.json'), **rule)


@pytest.fixture(scope='session')
def model_variants(tmp_path_factory, trained_steps):
    """Models of the small data that predict differently from the exported candidate, exported as candidates: a
    worse one (40 steps) and a better one (wider, with dropout: 0.94 against 0.91, no digit more than 0.012 worse);
    {name: folder}."""
    work = tmp_path_factory.mktemp('variants')
    folders = {}
    for name, changes in (('worse', {'epoch': 40}), ('better', {'num_hidden_layer_1': 256, 'num_hidden_layer_2': 128,
                                                                 'dropout': 0.5, 'learning_rate': 0.1, 'epoch': 400})):
        model_dir, metrics = str(work / f'{name}-model'), str(work / f'{name}-metrics')
        train.train(trained_steps['dataset.npz'], model_dir, **dict(TINY_HPARAMS, **changes))
        evaluate.evaluate(trained_steps['dataset.npz'], model_dir, os.path.join(metrics, 'metrics.json'),
                          os.path.join(metrics, 'kfp.json'), os.path.join(metrics, 'ui.json'))
        folders[name] = str(work / name)
        export.export(model_dir, os.path.join(metrics, 'metrics.json'), folders[name])
    return folders


@pytest.fixture(scope='session')
def model_base_dir(tmp_path_factory, exported_candidate):
    """An export base folder holding version 1 of the small model; copy it before changing it."""
    base = tmp_path_factory.mktemp('models') / 'mnist_model'
    promote_into(exported_candidate, base)
    return str(base)


def set_recorded_accuracy(model_dir, accuracy):
    """Pretend the model in model_dir (a version or a candidate) scored `accuracy`, by editing its run record."""
    path = os.path.join(model_dir, 'assets.extra', 'run.json')
    with open(path) as file:
        record = json.load(file)
    record['accuracy'] = accuracy
    with open(path, 'w') as file:
        json.dump(record, file)
