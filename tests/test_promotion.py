"""Tests of the promotion rule (mnist.promote) and of rolling back (mnist.py --retire): the real mnist.py and Katib
trial command lines on a slice of the data, and promote() itself on an exported candidate.

    python3 -m pytest -q tests/test_promotion.py
"""
import json
import os
import re
import shutil

import pytest

from conftest import REPO, TINY_HPARAMS, promote_into, run_script, set_recorded_accuracy

MNIST_PY = os.path.join(REPO, 'mnist_model', 'mnist.py')
TRIAL_PY = os.path.join(REPO, 'mnist_hyper_tuning.py')
PROMOTE_PY = os.path.join(REPO, 'mnist_model', 'promote.py')
TINY_FLAGS = [f'--{name}={value}' for name, value in TINY_HPARAMS.items() if name != 'epoch']


def candidate_accuracy(candidate):
    with open(os.path.join(candidate, 'assets.extra', 'run.json')) as file:
        return json.load(file)['accuracy']


def served_record(serving_dir, version):
    with open(os.path.join(serving_dir, str(version), 'assets.extra', 'run.json')) as file:
        return json.load(file)


def set_served_accuracy(serving_dir, version, accuracy):
    """Pretend the served version scored `accuracy`, by editing its run record."""
    set_recorded_accuracy(os.path.join(serving_dir, str(version)), accuracy)


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def serving_dir(tmp_path, model_base_dir):
    """A serving folder holding version 1 of the small model (a copy, free to change)."""
    folder = tmp_path / 'serving'
    shutil.copytree(model_base_dir, folder)
    return str(folder)


# ----------------------------------------------------------------------------------------- the real command line

@pytest.fixture(scope='module')
def good_then_worse(tmp_path_factory, small_data_path):
    """mnist.py three times into one serving folder: a good run, a worse one, the worse one with --force_export."""
    folder = str(tmp_path_factory.mktemp('cli') / 'serving')
    common = ['--data', small_data_path, '--export_dir', folder, '--log_dir', '', *TINY_FLAGS]
    runs = {'good': run_script(MNIST_PY, *common, '--epoch=300')}
    runs['worse'] = run_script(MNIST_PY, *common, '--epoch=20')
    runs['listing after worse'] = listing(folder)
    runs['forced'] = run_script(MNIST_PY, *common, '--epoch=20', '--force_export')
    return folder, runs


def metric_lines(stdout):
    return dict(re.findall(r'^(accuracy|loss)=(\d+\.\d{6})$', stdout, re.MULTILINE))


def test_a_worse_run_is_not_promoted_and_says_why(good_then_worse):
    folder, runs = good_then_worse
    assert runs['good'].returncode == 0, runs['good'].stderr
    assert re.search(r'^Promoted: version 1 \(test accuracy 0\.\d{4}\) exported to .*/1, the first version there '
                     r'\(1 000 test images, sha256 [0-9a-f]{8}\)\.$',
                     runs['good'].stdout, re.MULTILINE)
    worse = runs['worse']
    assert worse.returncode == 0, worse.stderr
    good_accuracy = float(metric_lines(runs['good'].stdout)['accuracy'])
    worse_accuracy = float(metric_lines(worse.stdout)['accuracy'])
    assert worse_accuracy < good_accuracy
    # One line naming both accuracies and the flag that overrides; the Katib metric lines still print.
    (line,) = [line for line in worse.stdout.splitlines() if line.startswith('Not promoted')]
    assert re.fullmatch(rf'Not promoted: its test accuracy {worse_accuracy:.4f} is below {good_accuracy:.4f} of '
                        rf'version 1 \(1 000 test images, sha256 [0-9a-f]{{8}}\); --force_export exports it anyway\.',
                        line)
    assert set(metric_lines(worse.stdout)) == {'accuracy', 'loss'}
    assert runs['listing after worse'] == ['1'], 'nothing left behind, no .tmp-* folder'


def test_force_export_adds_the_worse_version_and_records_it(good_then_worse):
    folder, runs = good_then_worse
    assert runs['forced'].returncode == 0, runs['forced'].stderr
    assert listing(folder) == ['1', '2']
    assert re.search(r'^Forced: version 2 \(test accuracy 0\.\d{4}\) exported to .*/2 without the promotion rule; it '
                     r'replaces 0\.\d{4} of version 1 \(1 000 test images, sha256 [0-9a-f]{8}\); the rule would have '
                     r'declined it: its test accuracy 0\.\d{4} is below 0\.\d{4} of version 1\.$', runs['forced'].stdout,
                     re.MULTILINE)
    first, second = served_record(folder, 1), served_record(folder, 2)
    assert first['model_version'] == 1 and first['promotion']['decision'] == 'promoted'
    assert first['promotion']['baseline_version'] is None
    assert second['model_version'] == 2 and second['promotion']['decision'] == 'forced'
    assert second['promotion']['baseline_version'] == 1
    assert second['promotion']['baseline_accuracy'] == first['accuracy'] > second['accuracy']


def test_a_katib_trial_that_exports_follows_the_same_rule(serving_dir, small_data_path):
    # A record claiming 0.999 for the served version changes nothing: the gate measures it.
    set_served_accuracy(serving_dir, 1, 0.999)
    process = run_script(TRIAL_PY, '--data', small_data_path, '--export_dir', serving_dir, *TINY_FLAGS, '--epoch=50')
    assert process.returncode == 0, process.stderr
    served = re.search(r'Not promoted: its test accuracy 0\.\d{4} is below (0\.\d{4}) of version 1 ', process.stderr)
    assert served and 0.85 < float(served.group(1)) < 0.99
    assert set(metric_lines(process.stdout)) == {'accuracy', 'loss'}, 'Katib must still record the trial'
    assert listing(serving_dir) == ['1']


@pytest.mark.parametrize('script, argv, message', [
    (MNIST_PY, ['--min_accuracy=1.5'], 'argument --min_accuracy: must be a test accuracy in [0, 1], got '),
    (MNIST_PY, ['--min_accuracy=-0.1'], 'argument --min_accuracy: must be a test accuracy in [0, 1], got '),
    (MNIST_PY, ['--min_improvement=-0.01'], 'argument --min_improvement: must be a number >= 0, got '),
    (MNIST_PY, ['--export_dir=', '--force_export'], 'apply to an export: --export_dir is empty'),
    (TRIAL_PY, ['--min_accuracy=0.9'], 'apply to an export: give --export_dir'),
    (TRIAL_PY, ['--export_dir=x', '--min_improvement=-1'], 'argument --min_improvement: must be a number >= 0'),
])
def test_bad_promotion_flags_are_one_line_and_change_nothing(script, argv, message, tmp_path):
    process = run_script(script, *argv, cwd=str(tmp_path))
    assert process.returncode == 2
    assert message in process.stderr.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------- promote() itself

def test_a_better_model_promotes_and_records_what_it_beat(serving_dir, model_variants):
    outputs = promote_into(model_variants['better'], serving_dir)
    assert outputs.promoted and outputs.model_version == 2
    record = served_record(serving_dir, 2)
    promotion, evidence = record['promotion'], record['promotion']['evidence']
    candidate, champion = evidence['candidate'], evidence['champion']
    assert candidate['accuracy'] > champion['accuracy'] == promotion['baseline_accuracy']
    assert record['accuracy'] == candidate['accuracy'], 'the served accuracy is the one measured now'
    assert re.fullmatch(rf'Promoted: version 2 \(test accuracy {candidate["accuracy"]:.4f}\) exported to '
                        rf'{re.escape(os.path.join(serving_dir, "2"))}; it replaces {champion["accuracy"]:.4f} of version '
                        rf'1 \(1 000 test images, sha256 [0-9a-f]{{8}}\)\.', outputs.decision)
    assert (promotion['decision'], promotion['baseline_version']) == ('promoted', 1)
    assert evidence['test_set']['examples'] == 1000 and len(candidate['per_digit']) == 10
    assert evidence['fixed'] > evidence['broken'] >= 0
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', promotion['promoted_at'])


def test_an_identical_model_is_declined_and_force_export_overrides(serving_dir, exported_candidate):
    outputs = promote_into(exported_candidate, serving_dir)
    assert not outputs.promoted and outputs.decision.startswith(
        'Not promoted: its predictions equal those of version 1 on all 1 000 test images')
    assert listing(serving_dir) == ['1']
    assert promote_into(exported_candidate, serving_dir, force_export=True).model_version == 2
    assert served_record(serving_dir, 2)['promotion']['evidence']['identical_predictions'] is True


def test_the_kfp_outputs_show_the_decision_and_both_models_per_digit(serving_dir, model_variants):
    outputs_dir = os.path.join(os.path.dirname(serving_dir), 'promote-outputs')

    def read(name):
        with open(os.path.join(outputs_dir, name)) as file:
            return json.load(file)

    promote_into(model_variants['better'], serving_dir)
    metrics = {metric['name']: metric['numberValue'] for metric in read('metrics.json')['metrics']}
    assert metrics['promoted'] == 1 and metrics['model-version'] == 2
    assert metrics['candidate-accuracy'] > metrics['served-accuracy'] > 0.5
    promote_into(model_variants['worse'], serving_dir)
    metrics = {metric['name']: metric['numberValue'] for metric in read('metrics.json')['metrics']}
    assert (metrics['promoted'], metrics['model-version']) == (0, 0)
    (markdown,) = read('ui-metadata.json')['outputs']
    assert markdown['type'] == 'markdown' and markdown['storage'] == 'inline'
    source = markdown['source']
    assert 'Not promoted: its test accuracy' in source and '| digit | version 2 | candidate | change |' in source
    assert len(re.findall(r'^\| [0-9] \| 0\.\d{4} \| 0\.\d{4} \| [+-]0\.\d{4} \|$', source, re.MULTILINE)) == 10


def test_min_improvement_and_the_floor_decline(serving_dir, model_variants):
    better = promote_into(model_variants['better'], os.path.join(os.path.dirname(serving_dir), 'probe'))
    accuracy = float(re.search(r'test accuracy (0\.\d{4})', better.decision).group(1))
    outputs = promote_into(model_variants['better'], serving_dir, min_improvement=0.5)
    assert not outputs.promoted and outputs.model_version == 0
    assert re.match(rf'Not promoted: its test accuracy {accuracy:.4f} is below 0\.\d{{4}} of version 1 \+ 0\.5 '
                    rf'\(--min_improvement\)', outputs.decision)
    outputs = promote_into(model_variants['better'], serving_dir, min_accuracy=0.999)
    assert outputs.decision.startswith(f'Not promoted: its test accuracy {accuracy:.4f} is below the floor 0.999 '
                                       f'(--min_accuracy)')
    assert listing(serving_dir) == ['1']
    # The floor applies to the very first version as well.
    empty = os.path.join(os.path.dirname(serving_dir), 'empty')
    assert not promote_into(model_variants['better'], empty, min_accuracy=0.999).promoted
    assert listing(empty) == []
    assert promote_into(model_variants['better'], serving_dir, min_accuracy=0.999,
                        force_export=True).model_version == 2


@pytest.mark.parametrize('damage', [
    lambda path: os.remove(path),
    lambda path: open(path, 'w').write('{"accuracy": "accuracy=9"}'),
    lambda path: open(path, 'w').write('{"accuracy": 1e9}'),
])
def test_records_are_never_decided_on(serving_dir, model_variants, damage):
    # Whatever the served version's run.json says, or if it has none, the gate measures it: a worse candidate is
    # declined against its real accuracy, a better one promoted.
    damage(os.path.join(serving_dir, '1', 'assets.extra', 'run.json'))
    worse = promote_into(model_variants['worse'], serving_dir)
    assert not worse.promoted and re.search(r'is below 0\.\d{4} of version 1 ', worse.decision)
    assert 'has no record of the test set it was judged on' in worse.decision
    assert promote_into(model_variants['better'], serving_dir).promoted


def test_a_version_that_cannot_be_loaded_is_not_a_baseline(serving_dir, model_variants, capsys):
    shutil.copytree(os.path.join(serving_dir, '1'), os.path.join(serving_dir, '2'))
    with open(os.path.join(serving_dir, '2', 'saved_model.pb'), 'wb') as broken:
        broken.write(b'not a SavedModel')
    outputs = promote_into(model_variants['worse'], serving_dir)
    assert not outputs.promoted and 'is below' in outputs.decision and 'of version 1 ' in outputs.decision
    (line,) = [line for line in capsys.readouterr().err.splitlines() if 'version 2' in line]
    assert line.startswith('warning: version 2 is not a baseline (a server cannot serve it either): ')


def test_a_model_that_breaks_the_serving_contract_is_declined(serving_dir, tmp_path, small_data_path):
    import tensorflow as tf

    # A model whose serving_default takes 100 numbers named x: a client of version 1 would get 400 from it.
    module = tf.Module()
    module.serve = tf.function(lambda x: {'digit': tf.zeros([tf.shape(x)[0]], tf.int64),
                                          'probabilities': tf.fill([tf.shape(x)[0], 10], 0.1)},
                               input_signature=[tf.TensorSpec([None, 100], tf.float32, name='x')])
    tf.saved_model.save(module, str(tmp_path / 'other'), signatures={'serving_default': module.serve})
    process = run_script(PROMOTE_PY, str(tmp_path / 'other'), '--serving_dir', serving_dir, '--data', small_data_path)
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith('Not promoted: it breaks the serving contract: signature serving_default: ')
    assert listing(serving_dir) == ['1']


def test_version_numbers_skip_other_folders_and_are_never_reused(tmp_path, exported_candidate):
    serving = tmp_path / 'serving'
    for name in ('3', 'data', '.tmp-11-abc', '12x', '.retired-10-20261126T120000Z'):
        (serving / name).mkdir(parents=True)
    assert promote_into(exported_candidate, serving).model_version == 11
    assert promote_into(exported_candidate, serving, model_version=5, force_export=True).model_version == 5
    with pytest.raises(FileExistsError, match='already exists'):
        promote_into(exported_candidate, serving, model_version=5, force_export=True)
    assert listing(serving) == ['.retired-10-20261126T120000Z', '.tmp-11-abc', '11', '12x', '3', '5', 'data']


@pytest.mark.parametrize('rule, message', [
    ({'min_accuracy': 1.5}, r'--min_accuracy must be a number in \[0, 1\]'),
    ({'min_improvement': -0.1}, '--min_improvement must be a number >= 0'),
    ({'max_digit_drop': float('nan')}, '--max_digit_drop must be a number in'),
])
def test_promote_checks_its_rule(serving_dir, exported_candidate, rule, message):
    with pytest.raises(ValueError, match=message):
        promote_into(exported_candidate, serving_dir, **rule)
    assert listing(serving_dir) == ['1']


def test_a_failed_copy_leaves_nothing_a_server_could_load(tmp_path, exported_candidate, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(shutil, 'copytree', crash)
    with pytest.raises(OSError, match='disk full'):
        promote_into(exported_candidate, tmp_path / 'serving')
    assert listing(tmp_path / 'serving') == []


def test_promote_takes_the_next_number_when_another_lands_first(tmp_path, exported_candidate, monkeypatch):
    serving = tmp_path / 'serving'
    real_copytree = shutil.copytree

    def copy_while_another_version_lands(*args, **kwargs):
        # copytree calls itself for every subfolder: the other version lands during the first call only.
        if not (serving / '1').exists():
            (serving / '1').mkdir()
            (serving / '1' / 'saved_model.pb').write_bytes(b'another export')
        return real_copytree(*args, **kwargs)

    monkeypatch.setattr(shutil, 'copytree', copy_while_another_version_lands)
    assert promote_into(exported_candidate, serving).model_version == 2
    assert served_record(serving, 2)['model_version'] == 2
    assert (serving / '1' / 'saved_model.pb').read_bytes() == b'another export'
    assert listing(serving) == ['1', '2']


# ------------------------------------------------------------------------------------------------------ roll back

def test_retire_takes_the_newest_version_out_of_service(serving_dir, exported_candidate):
    promote_into(exported_candidate, serving_dir, force_export=True)
    process = run_script(MNIST_PY, '--export_dir', serving_dir, '--retire', '2')
    assert process.returncode == 0, process.stderr
    names = listing(serving_dir)
    assert names[1:] == ['1'] and re.fullmatch(r'\.retired-2-\d{8}T\d{6}Z', names[0])
    assert process.stdout.strip() == (f'Retired version 2: renamed to {os.path.join(serving_dir, names[0])}; version 1 '
                                      f'is served again (servers switch within their poll interval).')
    # The retired folder is kept whole for inspection, and its number is not given out again.
    assert os.path.isfile(os.path.join(serving_dir, names[0], 'saved_model.pb'))
    assert promote_into(exported_candidate, serving_dir, force_export=True).model_version == 3
    # Retiring it again says that it was.
    again = run_script(MNIST_PY, '--export_dir', serving_dir, '--retire', '2')
    assert again.returncode == 1 and f'version 2 was already retired: it is {os.path.join(serving_dir, names[0])}' \
        in again.stderr


@pytest.mark.parametrize('argv, code, message', [
    (['--retire', '7'], 1, 'does not exist (versions there: 1)'),
    (['--retire', '1'], 1, 'version 1 is the last one in'),
    (['--retire', '1', '--epoch=5'], 2, '--retire takes only --export_dir, not --epoch'),
    (['--retire', 'two'], 2, 'argument --retire: must be an integer >= 1'),
])
def test_bad_retire_is_one_line_and_changes_nothing(serving_dir, argv, code, message):
    process = run_script(MNIST_PY, '--export_dir', serving_dir, *argv)
    assert process.returncode == code
    assert message in process.stderr.splitlines()[-1] and 'Traceback' not in process.stderr
    assert listing(serving_dir) == ['1']


# ------------------------------------------------------------------------------- promote.py: a gate for any model



def leaky_data(small_data_path, folder):
    """The small data with its test split replaced by 10 images of its own training split (all ten digits)."""
    import numpy as np

    with np.load(small_data_path) as data:
        arrays = {name: data[name] for name in data.files}
    picks = [int(np.flatnonzero(arrays['y_train'] == digit)[0]) for digit in range(10)]
    arrays['x_test'], arrays['y_test'] = arrays['x_train'][picks], arrays['y_train'][picks]
    path = os.path.join(folder, 'leaky.npz')
    np.savez(path, **arrays)
    return path


def test_promote_py_promotes_any_saved_model_through_the_same_gate(serving_dir, model_variants, small_data_path):
    better = run_script(PROMOTE_PY, model_variants['better'], '--serving_dir', serving_dir, '--data', small_data_path)
    assert better.returncode == 0, better.stderr
    line, evidence_line, *table = better.stdout.splitlines()
    assert re.fullmatch(r'Promoted: version 2 \(test accuracy 0\.\d{4}\) exported to .*/2; it replaces 0\.\d{4} of '
                        r'version 1 \(1 000 test images, sha256 [0-9a-f]{8}\)\.', line)
    assert re.fullmatch(r'  candidate 0\.\d{4}, version 1 0\.\d{4} on 1 000 test images, sha256 [0-9a-f]{8}: \d+ fixed, '
                        r'\d+ broken, digit \d down 0\.\d{4} at most', evidence_line)
    assert table[:2] == ['| digit | version 1 | candidate | change |', '|---|---|---|---|'] and len(table) == 13
    assert listing(serving_dir) == ['1', '2']


@pytest.mark.parametrize('make_arguments, code, message', [
    (lambda variants, tmp: [variants['better'], '--serving_dir', 'x'], 2, 'the following arguments are required: --data'),
    (lambda variants, tmp: [variants['better'], '--serving_dir', 'x', '--data', 'd', '--max_digit_drop=2'], 2,
     'argument --max_digit_drop: must be a fraction in [0, 1], got '),
    (lambda variants, tmp: [str(tmp), '--serving_dir', 'x', '--data', 'd'], 1, 'not a SavedModel folder'),
])
def test_promote_py_errors_are_one_line(model_variants, tmp_path, make_arguments, code, message):
    process = run_script(PROMOTE_PY, *make_arguments(model_variants, tmp_path), cwd=str(tmp_path))
    assert process.returncode == code and 'Traceback' not in process.stderr
    assert message in process.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / 'x')


def test_a_test_split_leaked_from_training_is_refused_before_anything_is_judged(serving_dir, model_variants,
                                                                              small_data_path, tmp_path):
    leaky = leaky_data(small_data_path, str(tmp_path))
    for script, arguments in ((PROMOTE_PY, [model_variants['worse'], '--serving_dir', serving_dir, '--data', leaky]),
                              (MNIST_PY, ['--data', leaky, '--export_dir', serving_dir, '--log_dir', '', *TINY_FLAGS,
                                          '--epoch=20'])):
        process = run_script(script, *arguments)
        assert process.returncode == 1 and 'Traceback' not in process.stderr
        assert process.stderr.strip().splitlines()[-1].endswith(
            f'{leaky}: 10 of 10 test images are exact copies of training images; a test split must hold images the '
            f'model has not trained on')
    assert listing(serving_dir) == ['1']
