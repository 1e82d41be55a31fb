"""Tests of how the model server follows its version folder under faults: names that are not ASCII digits at start-up,
a version that fails to load (retried --max_num_load_retries times, and again once its files are rewritten in place),
and a poll that meets an error (one log line, the next poll runs, the loaded versions stay). One server process over
HTTP, and the poll's safety net in-process.

    python3 -m pytest -q tests/test_versions.py
"""
import os
import shutil
import signal
import time

import pytest
import requests

import model_server
import serving_versions

DATA_FILE = os.path.join('variables', 'variables.data-00000-of-00001')


def wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def available(url):
    try:
        states = requests.get(url, timeout=5).json()['model_version_status']
    except (requests.RequestException, KeyError, ValueError):
        return []
    return sorted(int(state['version']) for state in states if state['state'] == 'AVAILABLE')


def add_version(base, version, source):
    """Copy a version in the way an export does: whole under a hidden name, then renamed."""
    shutil.copytree(source, base / f'.tmp-{version}')
    os.rename(base / f'.tmp-{version}', base / str(version))


def test_the_server_survives_bad_names_failed_loads_and_poll_errors(tmp_path, model_base_dir):
    good = os.path.join(model_base_dir, '1')
    base = tmp_path / 'models'
    base.mkdir()
    add_version(base, 1, good)
    # Names str.isdigit() accepts but int() refuses or no server loads: present at start-up.
    for name in ('²', '٣', '007'):
        shutil.copytree(good, base / name)
    os.mkdir(base / '100')
    log_path = tmp_path / 'server.log'
    port = model_server.free_port()
    url = f'http://127.0.0.1:{port}/v1/models/mnist'
    with open(log_path, 'wb') as log_file:
        process = model_server.launch(str(base), port, ['--file_system_poll_wait_seconds=0.1',
                                                        '--max_num_load_retries=2',
                                                        '--load_retry_interval_micros=300000'], log_file)
    try:
        assert available(url) == [1]

        # A version whose weights are cut short fails to load: tried once and retried twice, 0.3 s apart.
        shutil.copytree(good, base / '.tmp-2')
        with open(base / '.tmp-2' / DATA_FILE, 'r+b') as data_file:
            data_file.truncate(100)
        os.rename(base / '.tmp-2', base / '2')
        assert wait_until(lambda: 'no more retries until its files change' in log_path.read_text())
        time.sleep(0.5)
        failures = [line for line in log_path.read_text().splitlines() if 'Failed to load version 2 ' in line]
        assert [line.rsplit('(', 1)[1] for line in failures] == [
            'retry 1 of 2 in 0.3 s)', 'retry 2 of 2 in 0.3 s)', 'no more retries until its files change)']
        assert available(url) == [1]

        # Rewriting the file in place changes no folder's modification time, yet the server notices and loads it.
        folder_times = [os.stat(base / '2').st_mtime_ns, os.stat(base / '2' / 'variables').st_mtime_ns]
        with open(os.path.join(good, DATA_FILE), 'rb') as source, open(base / '2' / DATA_FILE, 'r+b') as target:
            target.write(source.read())
        assert [os.stat(base / '2').st_mtime_ns, os.stat(base / '2' / 'variables').st_mtime_ns] == folder_times
        assert wait_until(lambda: available(url) == [1, 2])
        reply = requests.post(url + ':predict', json={'instances': [[0.0] * 784]}, timeout=10)
        assert reply.status_code == 200 and len(reply.json()['predictions']) == 1

        # The folder cannot be listed for a while (here: it is a file): one log line, and version 2 stays served.
        os.rename(base, tmp_path / 'away')
        base.write_text('not a folder')
        assert wait_until(lambda: 'error: cannot look at' in log_path.read_text())
        assert available(url) == [1, 2]
        base.unlink()
        os.rename(tmp_path / 'away', base)
        # The poll goes on: a new version is served.
        add_version(base, 3, good)
        assert wait_until(lambda: available(url) == [2, 3])
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    log = log_path.read_text()
    assert code == 0 and 'Traceback' not in log and log.rstrip().endswith('Server stopped')
    error_lines = [line for line in log.splitlines() if 'error: cannot look at' in line]
    assert error_lines and all(line.endswith('the loaded versions stay in service') for line in error_lines)
    assert not any(name in log for name in ('²', '٣', '007', 'version 100 '))


def test_a_poll_error_is_one_line_and_the_next_poll_runs(monkeypatch, capsys, tmp_path):
    calls = []

    def listing_that_fails_once(base_path):
        calls.append(base_path)
        if len(calls) == 1:
            raise RuntimeError('something nobody foresaw\nsecond line')
        return []

    monkeypatch.setattr(serving_versions, 'list_versions', listing_that_fails_once)
    repository = serving_versions.ModelRepository(str(tmp_path), 'mnist')
    repository.refresh()
    repository.refresh()
    assert len(calls) == 2
    assert capsys.readouterr().err.splitlines() == [
        f'error: cannot look at {tmp_path} for versions of model mnist: RuntimeError: something nobody foresaw; the '
        f'loaded versions stay in service']


@pytest.mark.parametrize('name, is_version', [('1', True), ('0', True), ('123456789', True), ('²', False),
                                              ('٣', False), ('007', False), ('1 ', False), ('+1', False),
                                              ('1' * 19, False), ('12x', False)])
def test_only_ascii_digit_names_are_versions(tmp_path, model_base_dir, name, is_version):
    os.mkdir(tmp_path / name)
    shutil.copy(os.path.join(model_base_dir, '1', 'saved_model.pb'), tmp_path / name)
    assert serving_versions.list_versions(str(tmp_path)) == ([int(name)] if is_version else [])


def test_predicts_use_the_direct_call_path_only_where_it_gives_the_public_calls_outputs(model_base_dir):
    """Every signature of a loaded version answers through a FlatCall that gives exactly what the public call gives;
    a signature function without TensorFlow's internal attribute, or whose direct path answers differently, keeps
    the public call."""
    import numpy as np
    import tensorflow as tf

    served = serving_versions.load_version(str(model_base_dir), max(model_server.list_versions(str(model_base_dir))))
    assert all(isinstance(served.callers[name], serving_versions.FlatCall) for name in served.signatures)
    pixels = tf.constant(np.random.default_rng(0).integers(0, 256, (3, 784)).astype(np.float32))
    public = served.signatures['serving_default'](pixels=pixels)
    direct = served.callers['serving_default'](pixels=pixels)
    assert direct.keys() == public.keys()
    assert all(np.array_equal(direct[name].numpy(), public[name].numpy()) for name in public)

    function = served.signatures['serving_default']
    examples = {'pixels': pixels}

    class WithoutInternals:
        structured_input_signature = function.structured_input_signature
        structured_outputs = function.structured_outputs

        def __call__(self, **tensors):
            return function(**tensors)

    stand_in = WithoutInternals()
    assert serving_versions.checked_flat_call('serving_default', stand_in, examples, public) is stand_in
    other = {name: tensor + 1 for name, tensor in public.items()}
    assert serving_versions.checked_flat_call('serving_default', function, examples, other) is function
    assert isinstance(serving_versions.checked_flat_call('serving_default', function, examples, public),
                      serving_versions.FlatCall)
