"""Tests of the promotion gate's evidence (mnist_model/evidence.py): the data checks, the test-set fingerprint, the
serving contract read from real and hand-made SavedModels, the measurement through serving_default and the rule's
decisions on real measurements, at tiny size (the conftest's small model on 1000 test images)."""
import ast
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import evaluate
import evidence
import export
import mnist
import train
from conftest import TINY_HPARAMS

EXPORTED_CONTRACT = {
    'serving_default': {'inputs': {'pixels': ('float32', (-1, 784))},
                        'outputs': {'probabilities': ('float32', (-1, 10)), 'digit': ('int64', (-1,))}},
    'predict_image': {'inputs': {'image_bytes': ('string', (-1,))},
                      'outputs': {'probabilities': ('float32', (-1, 10)), 'digit': ('int64', (-1,))}},
    # What predict_image classifies, for the drift monitor (export.py).
    'image_pixels': {'inputs': {'image_bytes': ('string', (-1,))}, 'outputs': {'pixels': ('float32', (-1, 784))}},
}


@pytest.fixture(scope='module')
def small_data(small_data_path):
    """The conftest's small data as arrays: x_train, y_train, x_test, y_test."""
    with np.load(small_data_path, allow_pickle=False) as data:
        return [data[key] for key in ('x_train', 'y_train', 'x_test', 'y_test')]


@pytest.fixture(scope='module')
def worse_candidate(tmp_path_factory, trained_steps):
    """A model trained on the same data for 20 steps instead of 300, exported: a real, worse model."""
    work = tmp_path_factory.mktemp('worse')
    model = train.train(trained_steps['dataset.npz'], str(work / 'model'), **{**TINY_HPARAMS, 'epoch': 20})
    evaluate.evaluate(trained_steps['dataset.npz'], str(work / 'model'), str(work / 'metrics.json'),
                   str(work / 'kfp-metrics.json'), str(work / 'ui.json'), trained_model=model)
    export.export(str(work / 'model'), str(work / 'metrics.json'), str(work / 'export'), trained_model=model)
    return str(work / 'export')


def save_module(path, input_name='pixels', width=784, classes=10):
    """Save a hand-made SavedModel whose serving_default takes input_name: float32[-1, width] and returns
    probabilities float32[-1, classes] and digit int64[-1] (a softmax of zero weights: every answer is digit 0)."""
    import tensorflow as tf

    module = tf.Module()
    module.weights = tf.Variable(tf.zeros([width, classes]))

    @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32, name=input_name)], autograph=False)
    def serve(values):
        probabilities = tf.nn.softmax(tf.matmul(values, module.weights))
        return {'probabilities': probabilities, 'digit': tf.argmax(probabilities, axis=1)}

    tf.saved_model.save(module, str(path), signatures={'serving_default': serve.get_concrete_function()})
    return str(path)


def altered(measurement, labels, fix=(), break_=()):
    """The measurement of a model that answers as `measurement` does, except that it answers the test images at the
    indices `fix` correctly and those at `break_` wrongly: paired evidence with known differences."""
    predictions = measurement.predictions.copy()
    predictions[list(fix)] = labels[list(fix)]
    predictions[list(break_)] = (labels[list(break_)] + 1) % 10
    accuracy, loss, per_digit = evidence.summarise(labels, predictions, None)
    return measurement._replace(name='the altered model', accuracy=accuracy, loss=loss, per_digit=per_digit,
                                predictions=predictions, correct=predictions == labels)


# --------------------------------------------------------------------------------------------------------- the data

def test_the_bundled_data_is_fit_to_judge_on():
    with np.load(mnist.DEFAULT_DATA, allow_pickle=False) as data:
        evidence.check_dataset(data['x_train'], data['y_train'], data['x_test'], data['y_test'], 'mnist.npz')


def test_leaked_test_images_are_counted_exactly(small_data):
    x_train, y_train, x_test, y_test = small_data
    leaked = x_test.copy()
    leaked[:12] = x_train[100:112]
    # A copy with one pixel changed is not an exact copy.
    leaked[20] = x_train[5]
    leaked[20, 3, 3] ^= 1
    with pytest.raises(ValueError) as error:
        evidence.check_dataset(x_train, y_train, leaked, y_test, 'leaky.npz')
    assert str(error.value) == ('leaky.npz: 12 of 1 000 test images are exact copies of training images; a test '
                                'split must hold images the model has not trained on')


def test_key_collisions_never_count_as_copies(small_data, monkeypatch):
    x_train, _, x_test, _ = small_data
    x_train, leaked = x_train[:300], x_test[:300].copy()
    leaked[:3] = x_train[:3]
    # Every image gets the same key: only the pixel-by-pixel comparison can tell copies apart.
    monkeypatch.setattr(evidence, 'row_keys', lambda images: np.zeros(len(images), np.uint64))
    assert evidence.count_leaked(x_train, leaked) == 3


@pytest.mark.parametrize('change, message', [
    (lambda data: data.__setitem__(3, np.where(data[3] == 3, 5, data[3]).astype(np.uint8)),
     'data.npz: the test split has no example of digit 3; a model is judged on all ten digits'),
    (lambda data: data.__setitem__(2, data[2].astype(np.float32)),
     'data.npz: test images must be uint8 of shape (N, 28, 28), got float32 (1000, 28, 28)'),
    (lambda data: data.__setitem__(0, data[0].reshape(-1, 784)),
     'data.npz: train images must be uint8 of shape (N, 28, 28), got uint8 (3000, 784)'),
    (lambda data: data.__setitem__(1, data[1].astype(np.float64)),
     'data.npz: train labels must be a 1-D integer array, got float64 (3000,)'),
    (lambda data: data.__setitem__(3, np.concatenate([np.full(5, 10, np.uint8), data[3][5:]])),
     'data.npz: 5 test labels are not digits 0-9 (found 0..10)'),
    (lambda data: data.__setitem__(3, data[3][:999]),
     'data.npz: 1000 test images but 999 labels'),
])
def test_data_unfit_to_judge_on_is_one_line(small_data, change, message):
    data = list(small_data)
    change(data)
    with pytest.raises(ValueError) as error:
        evidence.check_dataset(*data, 'data.npz')
    assert str(error.value) == message


def test_the_fingerprint_names_the_test_set(small_data):
    _, _, x_test, y_test = small_data
    fingerprint = evidence.fingerprint_test_split(x_test, y_test)
    assert fingerprint == evidence.fingerprint_test_split(x_test.copy(), y_test.astype(np.int64))
    relabelled = y_test.copy()
    relabelled[0] = (relabelled[0] + 1) % 10
    assert evidence.fingerprint_test_split(x_test, relabelled).sha256 != fingerprint.sha256
    assert evidence.fingerprint_test_split(x_test[:999], y_test[:999]).examples == 999
    assert evidence.describe_test_split(fingerprint) == f'1 000 test images, sha256 {fingerprint.sha256[:8]}'
    assert len(fingerprint.sha256) == 64


# ------------------------------------------------------------------------------------------ the serving contract

def test_the_contract_of_an_export(exported_candidate):
    assert evidence.signature_contract(exported_candidate) == EXPORTED_CONTRACT
    assert evidence.contract_difference(EXPORTED_CONTRACT, evidence.signature_contract(exported_candidate)) == ''


def test_a_hand_made_model_with_another_input_breaks_the_contract(exported_candidate, tmp_path):
    served = evidence.signature_contract(exported_candidate)
    narrow = evidence.signature_contract(save_module(tmp_path / 'narrow', width=100))
    assert evidence.contract_difference(served, narrow, 'version 3') == (
        'signature serving_default: input pixels is float32[-1,100] in the candidate, float32[-1,784] in version 3')
    renamed = evidence.signature_contract(save_module(tmp_path / 'renamed', input_name='x', width=100))
    assert evidence.contract_difference(served, renamed, 'version 3') == (
        'signature serving_default: input pixels (float32[-1,784] in version 3) is missing in the candidate')
    # Right serving_default, but no image signatures: clients that send PNGs would get errors.
    pixels_only = evidence.signature_contract(save_module(tmp_path / 'pixels-only'))
    assert evidence.contract_difference(served, pixels_only, 'version 3') == (
        'signature image_pixels of version 3 is missing in the candidate (it offers: serving_default)')
    # The other way round nothing is missing: a candidate may offer more.
    assert evidence.contract_difference(pixels_only, served, 'version 3') == ''


@pytest.mark.parametrize('candidate_change, difference', [
    (lambda contract: contract['serving_default']['outputs'].update(logits=('float32', (-1, 10))), ''),
    (lambda contract: contract.update(extra={'inputs': {}, 'outputs': {}}), ''),
    (lambda contract: contract['serving_default']['inputs'].update(pixels=('float32', (-1, -1))), ''),
    (lambda contract: contract['serving_default']['inputs'].update(pixels=('float32', None)), ''),
    (lambda contract: contract['serving_default']['inputs'].update(pixels=('float64', (-1, 784))),
     'signature serving_default: input pixels is float64[-1,784] in the candidate, float32[-1,784] in version 3'),
    (lambda contract: contract['serving_default']['inputs'].update(pixels=('float32', (-1, 28, 28))),
     'signature serving_default: input pixels is float32[-1,28,28] in the candidate, float32[-1,784] in version 3'),
    (lambda contract: contract['serving_default']['inputs'].update(scale=('float32', (-1,))),
     'signature serving_default: input scale of the candidate is not an input in version 3'),
    (lambda contract: contract['predict_image']['outputs'].pop('digit'),
     'signature predict_image: output digit (int64[-1] in version 3) is missing in the candidate'),
    (lambda contract: contract['predict_image']['outputs'].update(digit=('int32', (-1,))),
     'signature predict_image: output digit is int32[-1] in the candidate, int64[-1] in version 3'),
])
def test_contract_differences(candidate_change, difference):
    candidate = {name: {kind: dict(tensors) for kind, tensors in signature.items()}
                 for name, signature in EXPORTED_CONTRACT.items()}
    candidate_change(candidate)
    assert evidence.contract_difference(EXPORTED_CONTRACT, candidate, 'version 3') == difference


def test_a_folder_without_a_saved_model_has_no_contract(tmp_path):
    with pytest.raises(ValueError, match=r'cannot read saved_model.pb'):
        evidence.signature_contract(str(tmp_path))
    (tmp_path / 'saved_model.pb').write_bytes(b'\xff\xff not a proto')
    with pytest.raises(ValueError, match=r'saved_model.pb: not a SavedModel'):
        evidence.signature_contract(str(tmp_path))


# ------------------------------------------------------------------------------------------------- measurement

def test_measure_gives_the_trainers_figures(exported_candidate, trained_steps, small_data):
    _, _, x_test, y_test = small_data
    measured = evidence.measure(exported_candidate, x_test, y_test, name='the candidate')
    with open(trained_steps['metrics.json']) as file:
        metrics = json.load(file)
    # Through the SavedModel's serving_default, the same accuracy as evaluate() got from the Keras model.
    assert measured.accuracy == metrics['accuracy']
    assert measured.loss == pytest.approx(metrics['loss'], abs=1e-6)
    assert measured.predictions.dtype == np.int64 and measured.predictions.shape == (1000,)
    counts = np.bincount(y_test, minlength=10)
    assert np.dot(measured.per_digit, counts) / 1000 == pytest.approx(measured.accuracy)
    assert measured.test_set == evidence.fingerprint_test_split(x_test, y_test)
    assert measured.name == 'the candidate' and 0 < measured.seconds < 60
    assert 0.5 < measured.accuracy < 1


def test_models_that_cannot_be_measured_are_one_line(tmp_path, small_data):
    _, _, x_test, y_test = small_data
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError) as error:
        evidence.measure(str(tmp_path / 'empty'), x_test, y_test)
    assert str(error.value).startswith(f'{tmp_path / "empty"}: cannot be loaded as a SavedModel (')
    assert '\n' not in str(error.value)
    narrow = save_module(tmp_path / 'narrow', width=100)
    with pytest.raises(ValueError) as error:
        evidence.measure(narrow, x_test, y_test)
    assert str(error.value) == (f'{narrow}: serving_default takes pixels float32[-1,100], not one input of '
                                'float32[-1,784] pixels 0-255')
    three_classes = save_module(tmp_path / 'three', classes=3)
    with pytest.raises(ValueError) as error:
        evidence.measure(three_classes, x_test, y_test)
    assert str(error.value) == (f'{three_classes}: serving_default output probabilities is float32[1000, 3] for 1000 '
                                'images, not float[1000,10]')


def test_a_hand_made_model_with_the_contract_is_measured(tmp_path, small_data):
    _, _, x_test, y_test = small_data
    measured = evidence.measure(save_module(tmp_path / 'zeros'), x_test, y_test)
    # Zero weights: every probability is 0.1 and every answer digit 0.
    assert measured.accuracy == np.mean(y_test == 0)
    assert measured.per_digit == (1.0,) + (0.0,) * 9
    assert measured.loss == pytest.approx(math.log(10), rel=1e-6)


def test_the_champion_is_the_newest_version_that_can_be_measured(exported_candidate, worse_candidate, tmp_path,
                                                                 small_data):
    _, _, x_test, y_test = small_data
    broken = tmp_path / '5'
    shutil.copytree(exported_candidate, broken)
    (broken / 'saved_model.pb').write_bytes(b'truncated')
    version, champion, notes = evidence.find_champion([(5, str(broken)), (4, worse_candidate)], x_test, y_test)
    assert version == 4 and champion.name == 'version 4'
    assert len(notes) == 1 and notes[0].startswith(
        f'version 5 is not a baseline (a server cannot serve it either): {broken}: cannot be loaded as a SavedModel')
    assert evidence.find_champion([(5, str(broken))], x_test, y_test) == (None, None, notes)


# ----------------------------------------------------------------------------------------------------- the rule

@pytest.fixture(scope='module')
def measured(exported_candidate, worse_candidate, small_data):
    """The real candidate and the real worse model, measured on the small test split."""
    _, _, x_test, y_test = small_data
    return (evidence.measure(exported_candidate, x_test, y_test, name='the candidate'),
            evidence.measure(worse_candidate, x_test, y_test, name='version 2'))


def test_a_better_model_is_promoted_and_a_worse_one_declined(measured):
    better, worse = measured
    assert better.accuracy > worse.accuracy + 0.05
    reason, record = evidence.judge(better, worse)
    assert reason == '' and record['decision'] == 'promoted'
    assert record['identical_predictions'] is False
    assert record['fixed'] - record['broken'] == round((better.accuracy - worse.accuracy) * 1000)
    assert record['candidate']['per_digit'] == [round(value, 6) for value in better.per_digit]
    # The record goes into run.json as it is: plain JSON, no NaN.
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    reason, record = evidence.judge(worse._replace(name='the candidate'), better._replace(name='version 3'))
    assert reason == f'its test accuracy {worse.accuracy:.4f} is below {better.accuracy:.4f} of version 3'
    assert record['decision'] == 'declined' and record['reason'] == reason


def test_an_identical_model_is_declined_unless_forced(measured):
    better, _ = measured
    reason, record = evidence.judge(better, better._replace(name='version 3'))
    assert reason == ('its predictions equal those of version 3 on all 1 000 test images: it serves nothing new '
                      '(identical)')
    assert record['identical_predictions'] is True and record['changed_predictions'] == 0
    reason, record = evidence.judge(better, better._replace(name='version 3'), evidence.Rule(force_export=True))
    assert reason == '' and record['decision'] == 'forced' and 'identical' in record['reason']


def test_a_model_worse_on_one_digit_is_declined(measured, small_data):
    _, worse = measured
    labels = small_data[3].astype(np.int64)
    wrong = np.flatnonzero(~worse.correct)
    sevens = np.flatnonzero(worse.correct & (labels == 7))
    # Better overall by 40 images, but 6 of the 7s it got right are now wrong (about 0.06 of digit 7).
    others = [index for index in wrong if labels[index] != 7][:46]
    candidate = altered(worse, labels, fix=others, break_=sevens[:6])
    assert candidate.accuracy == pytest.approx(worse.accuracy + 0.040)
    drop = worse.per_digit[7] - candidate.per_digit[7]
    reason, record = evidence.judge(candidate, worse)
    assert reason == (f'it is better overall ({candidate.accuracy:.4f} against {worse.accuracy:.4f} of version 2) but '
                      f'its accuracy on digit 7 falls from {worse.per_digit[7]:.4f} to {candidate.per_digit[7]:.4f}, '
                      'by more than 0.03 (--max_digit_drop)')
    assert record['largest_digit_drop'] == {'digit': 7, 'drop': round(drop, 6)}
    assert evidence.judge(candidate, worse, evidence.Rule(max_digit_drop=0.1))[0] == ''
    # A drop of one 7 (about 0.01) is within the default margin.
    assert evidence.judge(altered(worse, labels, fix=others, break_=sevens[:1]), worse)[0] == ''


def test_the_floor_the_margin_the_test_set_size_and_the_contract(measured):
    better, worse = measured
    assert evidence.judge(better, None, evidence.Rule(min_accuracy=0.99))[0] == (
        f'its test accuracy {better.accuracy:.4f} is below the floor 0.99 (--min_accuracy)')
    assert evidence.judge(better, worse, evidence.Rule(min_improvement=0.5))[0] == (
        f'its test accuracy {better.accuracy:.4f} is below {worse.accuracy:.4f} of version 2 + 0.5 (--min_improvement)')
    assert evidence.judge(better, None, evidence.Rule(min_test_examples=10000))[0] == (
        'it was measured on only 1 000 test images; the gate decides on at least 10 000 (--min_test_examples)')
    change = 'signature serving_default: input pixels is float32[-1,100] in the candidate, float32[-1,784] in version 2'
    reason, record = evidence.judge(better, worse, evidence.Rule(force_export=True), change)
    assert reason == '' and record['reason'] == f'it breaks the serving contract: {change}'
    assert record['contract_difference'] == change
    reason, record = evidence.judge(better, None)
    assert reason == '' and record['champion'] is None and record['identical_predictions'] is None


def test_numbers_that_are_not_evidence_are_refused(measured, small_data):
    better, worse = measured
    for broken in (better._replace(accuracy=float('nan')), better._replace(loss=float('inf')),
                   better._replace(per_digit=(1.5,) * 10), better._replace(accuracy='0.99')):
        with pytest.raises(ValueError, match='the candidate: its '):
            evidence.judge(broken, worse)
    for rule in (evidence.Rule(min_accuracy=float('nan')), evidence.Rule(min_improvement=-0.5),
                 evidence.Rule(max_digit_drop=True), evidence.Rule(min_test_examples=0),
                 evidence.Rule(force_export='yes')):
        with pytest.raises(ValueError, match=r'^--\w+ must be (a number|true or false)'):
            evidence.judge(better, worse, rule)
    _, _, x_test, y_test = small_data
    other_set = better._replace(test_set=evidence.fingerprint_test_split(x_test[:999], y_test[:999]))
    with pytest.raises(ValueError, match='were measured on different test sets'):
        evidence.judge(other_set, worse)


def test_the_record_reads_as_a_line_and_a_table(measured):
    better, worse = measured
    _, record = evidence.judge(better, worse)
    line = evidence.describe_evidence(record)
    assert line.startswith(f'candidate {better.accuracy:.4f}, version 2 {worse.accuracy:.4f} on 1 000 test images, '
                           f'sha256 {better.test_set.sha256[:8]}: {record["fixed"]} fixed, {record["broken"]} broken')
    table = evidence.per_digit_table(record).splitlines()
    assert table[0] == '| digit | version 2 | candidate | change |' and len(table) == 13
    assert table[-1] == (f'| all | {worse.accuracy:.4f} | {better.accuracy:.4f} | '
                         f'{better.accuracy - worse.accuracy:+.4f} |')
    _, alone = evidence.judge(better, None)
    assert evidence.per_digit_table(alone).splitlines()[0] == '| digit | candidate |'
    assert evidence.describe_evidence(alone).endswith('no version served to compare with')


def test_a_changed_test_set_is_named(measured):
    better, _ = measured

    def run_info(test_set):
        return {'accuracy': 0.99, 'promotion': {'decision': 'promoted', 'evidence': {'test_set': test_set}}}

    assert evidence.changed_test_split(better.test_set, run_info(better.test_set._asdict()), 'version 2') == ''
    other = run_info({'examples': 10, 'sha256': 'ab' * 32})
    assert evidence.changed_test_split(better.test_set, other, 'version 2') == (
        'version 2 was last judged on another test set (10 test images, sha256 abababab)')
    for malformed in (None, 'accuracy=9', {'promotion': 'forced'}, run_info([]), run_info({'examples': True}),
                      run_info({'examples': 10, 'sha256': 'accuracy=9\n' * 6 + 'abcd'}),
                      run_info({'examples': -1, 'sha256': 'ab' * 32})):
        assert evidence.changed_test_split(better.test_set, malformed, 'version 2') == (
            'version 2 has no record of the test set it was judged on')


def test_the_gate_measures_both_and_declines_worse_identical_and_contract_breaking(
        exported_candidate, worse_candidate, tmp_path, small_data):
    _, _, x_test, y_test = small_data
    test_split = (x_test, y_test)
    # The better model against the worse one served: promoted, on evidence measured now.
    verdict = evidence.gate(exported_candidate, [(2, worse_candidate)], test_split)
    assert verdict.reason == '' and verdict.champion_version == 2 and verdict.passed_over == []
    assert verdict.record['champion']['name'] == 'version 2' and verdict.record['decision'] == 'promoted'
    # The worse against the better: declined. The same model again: declined as identical.
    assert evidence.gate(worse_candidate, [(3, exported_candidate)], test_split).reason.startswith(
        'its test accuracy ')
    assert evidence.gate(exported_candidate, [(3, exported_candidate)], test_split).reason.endswith('(identical)')
    # A model taking 100 inputs cannot be fed the test pixels: declined with the contract's first difference.
    narrow = save_module(tmp_path / 'narrow', width=100)
    verdict = evidence.gate(narrow, [(3, exported_candidate)], test_split)
    assert verdict.reason == ('it breaks the serving contract: signature serving_default: input pixels is '
                              'float32[-1,100] in the candidate, float32[-1,784] in version 3')
    assert verdict.candidate is None and 'serving_default takes pixels' in verdict.record['measurement_error']
    forced = evidence.gate(narrow, [(3, exported_candidate)], test_split, evidence.Rule(force_export=True))
    assert forced.reason == '' and forced.record['decision'] == 'forced'
    assert forced.record['reason'] == verdict.reason
    assert evidence.per_digit_table(forced.record).splitlines()[0] == '| digit | version 3 |'
    assert evidence.describe_evidence(forced.record).startswith('the candidate could not be measured on 1 000 ')
    # With nothing served there is no contract to break, but it still cannot be measured.
    assert evidence.gate(narrow, [], test_split).reason.startswith(
        f'it cannot be measured: {narrow}: serving_default takes pixels float32[-1,100]')


def test_the_gate_under_the_lock_reuses_the_candidates_measurement(exported_candidate, worse_candidate,
                                                                   small_data, monkeypatch):
    _, _, x_test, y_test = small_data
    first = evidence.gate(exported_candidate, [], (x_test, y_test))
    assert first.reason == '' and first.champion is None and first.record['champion'] is None
    measured_folders = []
    real_measure = evidence.measure

    def counting_measure(folder, *rest, **named):
        measured_folders.append(folder)
        return real_measure(folder, *rest, **named)

    monkeypatch.setattr(evidence, 'measure', counting_measure)
    again = evidence.gate(exported_candidate, [(1, worse_candidate)], (x_test, y_test), candidate=first.candidate)
    assert measured_folders == [worse_candidate] and again.reason == '' and again.champion_version == 1
    with pytest.raises(ValueError, match='cannot read saved_model.pb'):
        evidence.gate(os.path.dirname(worse_candidate), [], (x_test, y_test))


def test_the_module_can_be_embedded_in_a_component():
    """The KFP steps embed the module's source verbatim in the stock TensorFlow image: at module level it may import
    only the standard library and numpy, and it must not run anything when executed as a program."""
    source_path = os.path.join(os.path.dirname(evidence.__file__), 'evidence.py')
    with open(source_path) as file:
        tree = ast.parse(file.read())
    imported = {alias.name.split('.')[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split('.')[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert imported <= {'hashlib', 'math', 'time', 'typing', 'numpy'}
    statements = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.Expr)
    assert all(isinstance(node, statements) for node in tree.body)
    assert all(isinstance(node.value, ast.Constant) for node in tree.body if isinstance(node, ast.Expr))
    # Run as a component runs it: the source as the program of `python3 -c`, then the step's call.
    with open(source_path) as file:
        program = file.read() + '\nprint(describe_test_split(Fingerprint(10000, "ab" * 32)))\n'
    process = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, timeout=60)
    assert (process.returncode, process.stdout) == (0, '10 000 test images, sha256 abababab\n'), process.stderr
