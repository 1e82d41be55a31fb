"""Shared fixtures: a small slice of the bundled data and one model exported from it, made once per test session."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
# Small layers and few steps: the tests check behaviour, the benchmarks check accuracy and speed.
TINY_HPARAMS = {'num_hidden_layer_1': 64, 'num_hidden_layer_2': 32, 'dropout': 1.0, 'learning_rate': 0.05,
                'epoch': 300, 'batch_size': 128, 'seed': 0}

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def run_script(*args, cwd=REPO, timeout=300, env=None):
    """Run a Python script of the repository as a user would, returning the finished process."""
    return subprocess.run([PYTHON, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope='session')
def small_data_path(tmp_path_factory):
    """The first 3000 training and 1000 test examples of the bundled data, in the Keras npz layout."""
    path = tmp_path_factory.mktemp('data') / 'mnist-small.npz'
    with np.load(mnist.DEFAULT_DATA, allow_pickle=False) as full:
        np.savez(path, x_train=full['x_train'][:3000], y_train=full['y_train'][:3000],
                 x_test=full['x_test'][:1000], y_test=full['y_test'][:1000])
    return str(path)


@pytest.fixture(scope='session')
def model_base_dir(tmp_path_factory, small_data_path):
    """An export base folder holding version 1, trained on the small data; copy it before changing it."""
    base = tmp_path_factory.mktemp('models')
    mnist.run(small_data_path, TINY_HPARAMS, export_dir=str(base))
    return str(base)
