"""Tests of promotion under races and faults: the baseline is the version a server would really serve, concurrent
promotions (real processes) never leave a worse model above a better one, the promotion lock survives dead and
foreign holders, stale .tmp-* folders are cleaned up, a full disk is one line, and Ctrl-C says whether the version
was promoted. Through the real entry points: mnist.py, the promote step's program as the pipeline runs it, and
promote() itself.

    python3 -m pytest -q tests/test_promotion_faults.py
"""
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest
import yaml

# The benchmark's racing promoters: spin until one instant, then promote.
from bench.promotion_race_bench import measured_accuracies, start_promoters
from conftest import PYTHON, REPO, SMALL_DATASET, TINY_HPARAMS, promote_into, run_script
import serving_folder

MNIST_PY = os.path.join(REPO, 'mnist_model', 'mnist.py')
FAULTS = os.path.join(REPO, 'tests', 'faults')
TINY_FLAGS = [f'--{name}={value}' for name, value in TINY_HPARAMS.items() if name != 'epoch']


def accuracy_of(model_dir):
    with open(os.path.join(model_dir, 'assets.extra', 'run.json')) as file:
        return json.load(file)


@pytest.fixture
def serving_dir(tmp_path, model_base_dir):
    """A serving folder holding version 1 of the small model."""
    folder = tmp_path / 'serving'
    shutil.copytree(model_base_dir, folder)
    return str(folder)


def hidden_and_visible(folder):
    names = sorted(os.listdir(folder))
    return [name for name in names if name.startswith('.')], [name for name in names if not name.startswith('.')]


# ------------------------------------------------------------------------------ the version a server would serve

def test_the_baseline_is_the_version_a_server_would_load(serving_dir, model_variants):
    # An empty integer folder, and a loadable copy of a worse model under a name str.isdigit() accepts but no server
    # loads.
    os.mkdir(os.path.join(serving_dir, '100'))
    shutil.copytree(model_variants['worse'], os.path.join(serving_dir, '²'))
    assert serving_folder.versions(serving_dir) == [1]
    worse = model_variants['worse']
    outputs = promote_into(worse, serving_dir)
    assert re.fullmatch(r'Not promoted: its test accuracy 0\.\d{4} is below 0\.\d{4} of version 1 \(1 000 test images, '
                        r'sha256 [0-9a-f]{8}\); --force_export exports it anyway\.', outputs.decision)
    # Forced, it takes a number above every integer folder, loadable or not.
    assert promote_into(worse, serving_dir, force_export=True).model_version == 101
    process = run_script(MNIST_PY, '--export_dir', serving_dir, '--retire', '100')
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip().endswith('; version 101 stays in service.')
    process = run_script(MNIST_PY, '--export_dir', serving_dir, '--retire', '101')
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip().endswith('; version 1 is served again (servers switch within their poll interval).')
    process = run_script(MNIST_PY, '--export_dir', serving_dir, '--retire', '1')
    assert process.returncode == 1 and 'version 1 is the last one in' in process.stderr


# ------------------------------------------------------------------------------------------ concurrent promotions

def test_concurrent_promotions_never_leave_a_worse_model_above_a_better_one(tmp_path, exported_candidate,
                                                                          model_variants):
    # The worse model is served; four processes promote the middle and the better model (two each) at one instant,
    # as hard as their decisions can race. Half of them act as pods on other hosts mounting the same volume, which
    # cannot tell whether the others still run.
    serving = str(tmp_path / 'serving')
    shutil.copytree(model_variants['worse'], os.path.join(serving, '1'))
    racers = [exported_candidate, model_variants['better']] * 2
    processes = start_promoters(racers, SMALL_DATASET['path'], serving, str(tmp_path), environment=lambda index: {
        'PYTHONPATH': FAULTS, 'PROMOTE_HOSTNAME': f'pod-{index}' if index % 2 else ''})
    results = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [stderr for _, stderr in results]
    decisions = [stdout.strip() for stdout, _ in results]
    assert all(re.match(r'(Promoted|Not promoted): ', decision) for decision in decisions), decisions
    versions, scores = measured_accuracies(serving)
    assert scores == sorted(scores), f'a worse model above a better one: versions {versions} score {scores}'
    assert len(versions) == 1 + sum(decision.startswith('Promoted') for decision in decisions) in (2, 3)
    records = [accuracy_of(os.path.join(serving, str(version))) for version in versions]
    assert records[-1]['hyperparameters']['num_hidden_layer_1'] == 256, 'the better model is served in the end'
    # Each promotion was decided against the version just below it, the one served at that moment.
    assert [record['promotion']['baseline_version'] for record in records[1:]] == versions[:-1]
    assert hidden_and_visible(serving)[0] == [], 'no lock or staging folder left behind'


# ------------------------------------------------------------------------------------- the lock and its holders

def dead_process_record():
    """An owner record of a process of this host that has exited."""
    process = subprocess.run([PYTHON, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    record = serving_folder.owner()
    record.update(pid=int(process.stdout), start_time=1, token='dead')
    return record


def test_a_lock_left_by_a_dead_process_and_its_staging_folder_are_taken_over(serving_dir, exported_candidate,
                                                                            capfd):
    os.mkdir(os.path.join(serving_dir, '.promotion-lock'))
    with open(os.path.join(serving_dir, '.promotion-lock', 'owner.json'), 'w') as file:
        json.dump(dead_process_record(), file)
    for name, record in (('.tmp-dead', dead_process_record()), ('.tmp-alive', serving_folder.owner())):
        shutil.copytree(os.path.join(serving_dir, '1'), os.path.join(serving_dir, name))
        with open(os.path.join(serving_dir, name, '.promotion-owner.json'), 'w') as file:
            json.dump(record, file)
    started = time.monotonic()
    assert promote_into(exported_candidate, serving_dir, force_export=True).model_version == 2
    assert time.monotonic() - started < 5
    # The folder of a writer that still runs (this process) stays; the dead writer's is gone, and said so.
    assert hidden_and_visible(serving_dir) == (['.tmp-alive'], ['1', '2'])
    (line,) = [line for line in capfd.readouterr().err.splitlines() if line.startswith('Removed ')]
    assert re.fullmatch(rf'Removed {re.escape(serving_dir)}/\.tmp-dead, an unfinished promotion left by pid \d+ on '
                        rf'host {re.escape(socket.gethostname())} since .*, which is gone\.', line)


def test_a_live_holder_makes_others_wait_and_a_foreign_one_goes_stale(tmp_path):
    folder = str(tmp_path)
    still_held, release = serving_folder.lock(folder)
    with pytest.raises(TimeoutError, match=rf'\.promotion-lock is held by pid {os.getpid()} on host '
                                           rf'{re.escape(socket.gethostname())} since .*: another promotion or '
                                           rf'retirement is running there \(waited 0\.3 s\)'):
        serving_folder.lock(folder, wait_seconds=0.3)
    assert still_held()
    release()
    # A holder on another host cannot be asked whether it runs: its lock is taken over once it stayed unchanged.
    os.mkdir(tmp_path / '.promotion-lock')
    (tmp_path / '.promotion-lock' / 'owner.json').write_text(json.dumps({'host': 'other-pod', 'pid': 1,
                                                                         'token': 'foreign'}))
    started = time.monotonic()
    still_held, release = serving_folder.lock(folder, wait_seconds=5, stale_seconds=0.3)
    assert 0.3 <= time.monotonic() - started < 3 and still_held()
    release()
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- full disk, Ctrl-C

@pytest.fixture
def tiny_volume(tmp_path):
    """A 400 KB file system (tmpfs, as root) or, where nothing can be mounted, None: the test then injects ENOSPC."""
    mount_point = tmp_path / 'volume'
    mount_point.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=400k', 'tmpfs', str(mount_point)],
                             capture_output=True).returncode == 0
    yield str(mount_point) if mounted else None
    if mounted:
        subprocess.run(['umount', str(mount_point)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_volume, tmp_path, small_data_path):
    serving = os.path.join(tiny_volume or str(tmp_path), 'serving')
    fault = {} if tiny_volume else {'PYTHONPATH': FAULTS, 'PROMOTE_FAULT': 'disk_full_after_bytes=300000'}
    process = run_script(MNIST_PY, '--data', small_data_path, '--export_dir', serving, '--log_dir', '',
                         *TINY_FLAGS, '--epoch=20', env=fault)
    assert process.returncode == 1
    last = process.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf'mnist\.py: error: cannot promote into {re.escape(serving)}: No space left on device'
                        rf'( \(.*\))?; nothing was added to it', last), process.stderr
    assert 'Traceback' not in process.stderr
    assert os.listdir(serving) == []


def promote_step_program():
    """The promote step's program exactly as the compiled pipeline runs it in its container."""
    with open(os.path.join(REPO, 'mnist_model', 'mnist_pipeline.yaml')) as package:
        templates = {template['name']: template for template in yaml.safe_load(package)['spec']['templates']}
    return templates['promote']['container']['command'][-1]


@pytest.mark.parametrize('fault, promoted', [('interrupt_while_copying', False), ('interrupt_after_rename', True)])
def test_ctrl_c_in_the_pipelines_promote_step_says_whether_it_promoted(serving_dir, exported_candidate, tmp_path,
                                                                      fault, promoted):
    outputs = tmp_path / 'outputs'
    process = subprocess.run(
        [PYTHON, '-c', promote_step_program(), '--export-dir', exported_candidate, '--dataset', SMALL_DATASET['path'],
         '--serving-dir', serving_dir, '--force-export', 'True', '--mlpipeline-metrics', str(outputs / 'metrics'),
         '--mlpipeline-ui-metadata', str(outputs / 'ui'), '----output-paths', str(outputs / 'a'), str(outputs / 'b'),
         str(outputs / 'c')],
        capture_output=True, text=True, timeout=120, env={**os.environ, 'PYTHONPATH': FAULTS, 'PROMOTE_FAULT': fault})
    assert process.returncode != 0 and process.stderr.strip().endswith('KeyboardInterrupt')
    (line,) = [line for line in process.stderr.splitlines() if line.startswith('promote: interrupted; ')]
    if promoted:
        assert line == f'promote: interrupted; version 2 was promoted: it is {os.path.join(serving_dir, "2")}'
        assert hidden_and_visible(serving_dir) == ([], ['1', '2'])
        assert accuracy_of(os.path.join(serving_dir, '2'))['model_version'] == 2
    else:
        assert line == f'promote: interrupted; nothing was promoted; {serving_dir} is as it was'
        assert hidden_and_visible(serving_dir) == ([], ['1'])


@pytest.mark.parametrize('fault, promoted', [('interrupt_while_copying', False), ('interrupt_after_rename', True)])
def test_sigterm_in_the_pipelines_promote_step_cleans_up_and_says_whether_it_promoted(
        serving_dir, exported_candidate, tmp_path, fault, promoted):
    # A pod being stopped gets SIGTERM: the step ends with 143, the version whole in place or not there at all.
    outputs = tmp_path / 'outputs'
    process = subprocess.run(
        [PYTHON, '-c', promote_step_program(), '--export-dir', exported_candidate, '--dataset', SMALL_DATASET['path'],
         '--serving-dir', serving_dir, '--force-export', 'True', '--mlpipeline-metrics', str(outputs / 'metrics'),
         '--mlpipeline-ui-metadata', str(outputs / 'ui'), '----output-paths', str(outputs / 'a'), str(outputs / 'b'),
         str(outputs / 'c')],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, 'PYTHONPATH': FAULTS, 'PROMOTE_FAULT': fault, 'PROMOTE_SIGNAL': 'TERM'})
    assert process.returncode == 143 and 'Traceback' not in process.stderr, process.stderr
    state = (f'version 2 was promoted: it is {os.path.join(serving_dir, "2")}' if promoted
             else f'nothing was promoted; {serving_dir} is as it was')
    assert process.stderr.strip().splitlines()[-1] == f'promote: terminated; {state}'
    assert hidden_and_visible(serving_dir) == ([], ['1', '2'] if promoted else ['1'])


def test_ctrl_c_in_mnist_py_says_the_version_was_promoted(serving_dir, small_data_path):
    process = run_script(MNIST_PY, '--data', small_data_path, '--export_dir', serving_dir, '--log_dir', '',
                         *TINY_FLAGS, '--epoch=20', '--force_export',
                         env={'PYTHONPATH': FAULTS, 'PROMOTE_FAULT': 'interrupt_after_rename'})
    assert process.returncode == 130 and 'Traceback' not in process.stderr
    assert process.stderr.strip().splitlines()[-2:] == [
        f'promote: interrupted; version 2 was promoted: it is {os.path.join(serving_dir, "2")}',
        'mnist.py: interrupted']
    assert hidden_and_visible(serving_dir) == ([], ['1', '2'])
