"""Tests of the trainer: the real mnist.py command line on a slice of the data, the step functions, the export
contract as TF Serving sees it (checked from a fresh process), and every user error."""
import gzip
import json
import os
import re
import stat

import numpy as np
import pytest

import drawn_digits
import load_data
import mnist
import train
from conftest import REPO, TINY_HPARAMS, run_script
from user_digits import redraw_digits

MNIST_PY = os.path.join(REPO, 'mnist_model', 'mnist.py')
# The demo's tuned values, with few steps so the test stays small.
DEMO_FLAGS = ['--num_hidden_layer_1=192', '--num_hidden_layer_2=64', '--dropout=0.4905680409621578',
              '--learning_rate=0.09105850855225119']
KATIB_METRIC = re.compile(r'([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)')


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory, small_data_path):
    """Two runs of the real command line into one export folder: from the repository root and from mnist_model/. The
    same seed makes the same model, which the gate declines as identical: the second run is forced."""
    work = tmp_path_factory.mktemp('cli')
    export_dir, log_dir = str(work / 'models'), str(work / 'logs')
    common = ['--data', small_data_path, '--export_dir', export_dir, '--log_dir', log_dir, '--epoch=250']
    from_root = run_script('mnist_model/mnist.py', *DEMO_FLAGS, *common)
    from_inside = run_script('mnist.py', *DEMO_FLAGS, *common, '--force_export', cwd=os.path.join(REPO, 'mnist_model'))
    return {'export_dir': export_dir, 'log_dir': log_dir, 'runs': [from_root, from_inside]}


def test_cli_trains_and_prints_katib_metrics(cli_runs):
    for process, decision in zip(cli_runs['runs'], ('Promoted: version 1', 'Forced: version 2')):
        assert process.returncode == 0, process.stderr
        assert 'Traceback' not in process.stderr
        metrics = [KATIB_METRIC.findall(line) for line in process.stdout.splitlines()]
        named = {match[0]: float(match[1]) for found in metrics for match in found}
        assert sorted(named) == ['accuracy', 'loss']
        assert sum('accuracy=' in line for line in process.stdout.splitlines()) == 1
        assert re.search(r'^accuracy=0\.\d{6}$', process.stdout, re.MULTILINE)
        # 250 steps on 3000 examples already beat chance by far.
        assert 0.8 < named['accuracy'] <= 1.0 and 0.0 < named['loss'] < 1.0
        assert re.search(r'^step +200/250 ', process.stdout, re.MULTILINE)
        assert decision in process.stdout and 'TensorBoard logs' in process.stdout
        assert 'warning' not in process.stderr
        # The last progress line and the summary name the same figure: the training time.
        progress = re.findall(r'^step +\d+/250 .*\(training ([0-9.]+) s\)$', process.stdout, re.MULTILINE)
        summary = re.search(r'^Test accuracy .*\(training took ([0-9.]+) s\)$', process.stdout, re.MULTILINE)
        assert len(progress) == 2 and float(progress[-1]) > 0 and summary.group(1) == progress[-1]


def test_cli_numbers_versions_and_writes_the_run_record(cli_runs):
    export_dir = cli_runs['export_dir']
    assert sorted(os.listdir(export_dir)) == ['1', '2']
    for version in ('1', '2'):
        folder = os.path.join(export_dir, version)
        assert os.path.isfile(os.path.join(folder, 'saved_model.pb'))
        assert os.path.isdir(os.path.join(folder, 'variables'))
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
        with open(os.path.join(folder, 'assets.extra', 'run.json')) as file:
            record = json.load(file)
        assert record['model_version'] == int(version)
        # The same seed gives the same model: the second run is identical, promoted by --force_export.
        assert record['promotion']['decision'] == ('promoted' if version == '1' else 'forced')
        assert record['promotion']['evidence']['identical_predictions'] is (None if version == '1' else True)
        assert record['promotion']['baseline_version'] == (None if version == '1' else 1)
        assert record['hyperparameters']['num_hidden_layer_1'] == 192
        assert record['hyperparameters']['epoch'] == 250
        assert record['tensorflow_version'].startswith('2.')
        assert 0 < record['train_seconds'] < 300
        assert re.fullmatch(r'[0-9a-f]{64}', record['data_sha256'])
    stdout = cli_runs['runs'][1].stdout
    assert re.search(r'^Forced: version 2 \(test accuracy 0\.\d{4}\) exported to .*/2 without the promotion rule; it '
                     r'replaces 0\.\d{4} of version 1 \(1 000 test images, sha256 [0-9a-f]{8}\); the rule would have '
                     r'declined it: its predictions equal those of version 1 ', stdout, re.MULTILINE)


def test_tensorboard_logs_have_scalars_images_and_hparams(cli_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(os.listdir(cli_runs['log_dir']))
    assert len(runs) == 2, 'each run gets its own folder'
    run_dir = os.path.join(cli_runs['log_dir'], runs[0])
    assert sorted(os.listdir(run_dir))[-2:] == ['train', 'validation']
    tags = {}
    for series in ('train', 'validation'):
        accumulator = EventAccumulator(os.path.join(run_dir, series), size_guidance={'tensors': 0, 'images': 0})
        accumulator.Reload()
        tags[series] = accumulator.Tags()
        steps = [event.step for event in accumulator.Tensors('loss')]
        assert steps == [200, 250], 'loss is logged over training steps'
    assert {'loss', 'accuracy'} <= set(tags['train']['tensors'])
    assert {'loss', 'accuracy', 'confusion_matrix', 'wrong_predictions'} <= set(tags['validation']['tensors'])
    root = EventAccumulator(run_dir)
    root.Reload()
    assert '_hparams_/session_start_info' in root.PluginTagToContent('hparams')
    assert len([name for name in os.listdir(run_dir) if name.startswith('events.out')]) == 1


def read_tensorboard_image(series_dir, tag):
    """The one image logged under tag: (its pixels as an array, the step, the description TensorBoard shows)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(series_dir, size_guidance={'tensors': 0})
    accumulator.Reload()
    [event] = accumulator.Tensors(tag)
    width, height, png = tf.make_ndarray(event.tensor_proto)
    pixels = tf.image.decode_png(png).numpy()
    assert pixels.shape[:2] == (int(height), int(width))
    return pixels, event.step, accumulator.SummaryMetadata(tag).summary_description


def test_tensorboard_figures_are_readable_pictures(cli_runs):
    validation_dir = os.path.join(cli_runs['log_dir'], sorted(os.listdir(cli_runs['log_dir']))[0], 'validation')
    for tag in ('confusion_matrix', 'wrong_predictions'):
        pixels, step, _ = read_tensorboard_image(validation_dir, tag)
        assert step == 250
        # Big enough for ten rows of four-digit counts, small enough for a TensorBoard card.
        assert 400 <= pixels.shape[1] <= 800 and 300 <= pixels.shape[0] <= 800, pixels.shape
        colours = pixels[:, :, :3].reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 50, 'a drawn figure, not a blank image'
    matrix, _, _ = read_tensorboard_image(validation_dir, 'confusion_matrix')
    red, green, blue = (matrix[:, :, channel].astype(int) for channel in range(3))
    assert np.sum((red > green + 60) & (red > blue + 60)) > 500, 'mistakes are drawn in red'
    assert np.sum((blue > red + 60) & (blue > green + 20)) > 500, 'right answers are drawn in blue'


def test_wrong_digit_grid_shows_the_most_confident_mistakes(cli_runs, small_data_path):
    import tensorflow as tf

    validation_dir = os.path.join(cli_runs['log_dir'], sorted(os.listdir(cli_runs['log_dir']))[0], 'validation')
    _, _, description = read_tensorboard_image(validation_dir, 'wrong_predictions')
    shown = [int(index) for index in
             re.search(r'indices in the test set: ([0-9, ]+)\.', description).group(1).split(', ')]
    # The first run exported version 1: ask it what it predicts for every test digit.
    with np.load(small_data_path) as data:
        x_test, y_test = data['x_test'].reshape(-1, 784).astype(np.float32), data['y_test']
    model = tf.saved_model.load(os.path.join(cli_runs['export_dir'], '1'))
    probabilities = model.signatures['serving_default'](pixels=tf.constant(x_test))['probabilities'].numpy()
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    wrong = set(np.flatnonzero(predicted != y_test).tolist())
    assert len(shown) == min(16, len(wrong)) and len(set(shown)) == len(shown)
    assert set(shown) <= wrong, 'every digit in the grid was predicted wrong'
    # Most confident first, and no mistake left out was more confident than the ones shown (up to float noise).
    assert all(earlier >= later - 1e-4 for earlier, later in zip(confidence[shown], confidence[shown][1:]))
    assert min(confidence[shown]) >= max(confidence[sorted(wrong - set(shown))], default=0.0) - 1e-4


CONTRACT_CHECK = r'''
import json, sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
report = {}
for name, function in loaded.signatures.items():
    inputs = function.structured_input_signature[1]
    report[name] = {
        'inputs': {key: [spec.dtype.name, spec.shape.as_list()] for key, spec in inputs.items()},
        'outputs': {key: [spec.dtype.name, spec.shape.as_list()] for key, spec in function.structured_outputs.items()}}
pixels = np.load(sys.argv[2])
served = loaded.signatures['serving_default'](pixels=tf.constant(pixels))
images = [open(path, 'rb').read() for path in sys.argv[3:]]
from_bytes = loaded.signatures['predict_image'](image_bytes=tf.constant(images))
report['probabilities'] = served['probabilities'].numpy().tolist()
report['digits'] = served['digit'].numpy().tolist()
report['image_digits'] = from_bytes['digit'].numpy().tolist()
report['scaled_digits'] = loaded.signatures['serving_default'](pixels=tf.constant(pixels / 255.0))['digit'].numpy().tolist()
print(json.dumps(report))
'''


def test_export_contract_from_a_fresh_process(model_base_dir, trained_steps, small_data_path, tmp_path):
    import keras
    from PIL import Image

    test_images = [os.path.join(REPO, 'mnist_model', 'test_data', f'{digit}.png') for digit in range(10)]
    # The shipped test digits first, then 500 test examples: one model load answers every question below.
    shipped = np.stack([np.asarray(Image.open(path)).reshape(784) for path in test_images]).astype(np.float32)
    with np.load(small_data_path) as data:
        pixels = data['x_test'][:500].reshape(-1, 784).astype(np.float32)
        labels = data['y_test'][:500]
    np.save(tmp_path / 'pixels.npy', np.concatenate([shipped, pixels]))
    script = tmp_path / 'check.py'
    script.write_text(CONTRACT_CHECK)
    # A fresh interpreter in an empty folder, with none of this project's code importable.
    process = run_script(str(script), os.path.join(model_base_dir, '1'), str(tmp_path / 'pixels.npy'), *test_images,
                         cwd=str(tmp_path), env={'PYTHONPATH': ''})
    assert process.returncode == 0, process.stderr
    report = json.loads(process.stdout.splitlines()[-1])

    assert report['serving_default'] == {
        'inputs': {'pixels': ['float32', [None, 784]]},
        'outputs': {'probabilities': ['float32', [None, 10]], 'digit': ['int64', [None]]}}
    assert report['predict_image'] == {
        'inputs': {'image_bytes': ['string', [None]]},
        'outputs': {'probabilities': ['float32', [None, 10]], 'digit': ['int64', [None]]}}
    # Raw 0-255 pixels are what the model expects; pre-scaled 0-1 pixels are not.
    digits = np.array(report['digits'][10:])
    assert np.mean(digits == labels) > 0.85
    assert np.mean(np.array(report['scaled_digits'][10:]) == labels) < 0.5
    # The reloaded model predicts what the trained Keras model predicts.
    model = keras.models.load_model(os.path.join(trained_steps['model'], 'model.keras'))
    np.testing.assert_allclose(report['probabilities'][10:], model.predict(pixels, verbose=0), atol=1e-5)
    # Both signatures agree on the shipped test digits, which are real MNIST digits of classes 0-9.
    assert report['image_digits'] == report['digits'][:10]


def test_saved_model_cli_shows_both_signatures(model_base_dir):
    process = run_script('-m', 'tensorflow.python.tools.saved_model_cli', 'show', '--all', '--dir',
                         os.path.join(model_base_dir, '1'))
    assert process.returncode == 0, process.stderr
    for expected in ("signature_def['serving_default']", "inputs['pixels']", "signature_def['predict_image']",
                     "inputs['image_bytes']", "outputs['probabilities']", "outputs['digit']", 'DT_INT64'):
        assert expected in process.stdout


def test_predict_image_reads_digits_as_users_draw_them(model_base_dir, small_data_path):
    import tensorflow as tf

    with np.load(small_data_path) as data:
        originals = data['x_test'][:200]
    images, kinds = redraw_digits(originals, seed=1)
    assert set(kinds) == {'L', 'RGB', 'RGBA', 'JPEG'}
    loaded = tf.saved_model.load(os.path.join(model_base_dir, '1'))
    from_pixels = loaded.signatures['serving_default'](pixels=tf.constant(originals.reshape(-1, 784), tf.float32))
    from_images = loaded.signatures['predict_image'](image_bytes=tf.constant(images))
    agreement = np.mean(from_pixels['digit'].numpy() == from_images['digit'].numpy())
    assert agreement >= 0.95, f'predict_image agrees with serving_default on only {agreement:.1%}'


def test_dropout_is_a_keep_probability(small_data_path, tmp_path):
    import keras

    dataset = str(tmp_path / 'dataset.npz')
    load_data.load_data(small_data_path, dataset)
    rates = {}
    for keep in (1.0, 0.75):
        model_dir = str(tmp_path / f'keep{keep}')
        train.train(dataset, model_dir, num_hidden_layer_1=16, num_hidden_layer_2=8, dropout=keep, epoch=10)
        model = keras.models.load_model(os.path.join(model_dir, 'model.keras'))
        rates[keep] = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
        assert [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)] == [16, 8, 10]
    assert rates == {1.0: [], 0.75: [pytest.approx(0.25)]}


def test_same_seed_same_model(small_data_path, tmp_path):
    results = [mnist.run(small_data_path, {**TINY_HPARAMS, 'epoch': 100, 'dropout': 0.5}) for _ in range(2)]
    assert results[0]['accuracy'] == results[1]['accuracy']
    assert results[0]['loss'] == pytest.approx(results[1]['loss'], abs=1e-6)


def test_divergence_is_an_error_and_exports_nothing(small_data_path, tmp_path):
    with pytest.raises(ValueError, match='training diverged'):
        mnist.run(small_data_path, {'learning_rate': 1e20, 'epoch': 50}, export_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_did_not_learn_warns_and_still_reports(small_data_path, capsys):
    exit_code = mnist.main(['--data', small_data_path, '--learning_rate=50', '--epoch=200', '--num_hidden_layer_1=16',
                            '--num_hidden_layer_2=16', '--export_dir', '', '--log_dir', ''])
    captured = capsys.readouterr()
    # Exit 0 and the metric lines: a Katib trial must record even a useless result.
    assert exit_code == 0, captured.err
    accuracy = float(re.search(r'^accuracy=(\S+)$', captured.out, re.MULTILINE).group(1))
    assert accuracy <= 0.2
    assert captured.err == (f'mnist.py: warning: test accuracy {accuracy:.4f} is near chance (0.1), so the model did '
                            f'not learn: --learning_rate 50 is probably too high\n')


def test_near_chance_warning_names_short_runs_and_stays_quiet_above_0_2(capsys):
    mnist.warn_if_near_chance(0.2, 0.01, 20)
    assert capsys.readouterr().err == ('mnist.py: warning: test accuracy 0.2000 is near chance (0.1), so the model '
                                       'did not learn: --learning_rate 0.01 is probably too high, or --epoch 20 is '
                                       'too few steps\n')
    mnist.warn_if_near_chance(0.2001, 50, 2000)
    assert capsys.readouterr().err == ''


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b''.join(size.to_bytes(4, 'big') for size in array.shape)
    content = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, 'wb') as file:
        file.write(content)


@pytest.mark.parametrize('compress', [False, True])
def test_load_data_reads_idx_folders(small_data_path, tmp_path, compress):
    with np.load(small_data_path) as data:
        arrays = {key: data[key] for key in ('x_train', 'y_train', 'x_test', 'y_test')}
    suffix = '.gz' if compress else ''
    for key, name in (('x_train', 'train-images-idx3-ubyte'), ('y_train', 'train-labels-idx1-ubyte'),
                      ('x_test', 't10k-images-idx3-ubyte'), ('y_test', 't10k-labels-idx1-ubyte')):
        write_idx(tmp_path / (name + suffix), arrays[key], compress)
    load_data.load_data(str(tmp_path), str(tmp_path / 'out' / 'dataset'))
    with np.load(tmp_path / 'out' / 'dataset', allow_pickle=False) as loaded:
        for key, array in arrays.items():
            np.testing.assert_array_equal(loaded[key], array)
        assert str(loaded['source']) == str(tmp_path)
        assert len(str(loaded['source_sha256'])) == 64


def test_load_data_records_the_bundled_checksum(tmp_path):
    load_data.load_data(mnist.DEFAULT_DATA, str(tmp_path / 'dataset.npz'))
    with np.load(tmp_path / 'dataset.npz', allow_pickle=False) as loaded:
        assert str(loaded['source_sha256']) == '06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64'
        assert loaded['x_train'].shape == (60000, 28, 28) and loaded['y_test'].shape == (10000,)


def bad_npz(path, **changes):
    arrays = {'x_train': np.zeros((20, 28, 28), np.uint8), 'y_train': np.zeros(20, np.uint8),
              'x_test': np.zeros((5, 28, 28), np.uint8), 'y_test': np.zeros(5, np.uint8)}
    arrays.update(changes)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return str(path)


@pytest.mark.parametrize('changes, message', [
    ({'x_train': np.zeros((20, 28, 27), np.uint8)}, 'shape'),
    ({'x_train': np.zeros((20, 28, 28), np.float32)}, 'uint8'),
    ({'y_train': np.full(20, 10, np.uint8)}, '0-9'),
    ({'y_test': np.zeros(4, np.uint8)}, 'labels'),
    ({'y_test': None}, 'missing arrays y_test'),
])
def test_load_data_rejects_invalid_arrays(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_data.load_data(bad_npz(tmp_path / 'bad.npz', **changes), str(tmp_path / 'out.npz'))


def test_load_data_rejects_truncated_idx(tmp_path, small_data_path):
    with np.load(small_data_path) as data:
        for key, name in (('x_train', 'train-images-idx3-ubyte'), ('y_train', 'train-labels-idx1-ubyte'),
                          ('x_test', 't10k-images-idx3-ubyte'), ('y_test', 't10k-labels-idx1-ubyte')):
            write_idx(tmp_path / name, data[key], compress=False)
    content = (tmp_path / 't10k-images-idx3-ubyte').read_bytes()
    (tmp_path / 't10k-images-idx3-ubyte').write_bytes(content[:-100])
    with pytest.raises(ValueError, match='truncated or corrupt'):
        load_data.load_data(str(tmp_path), str(tmp_path / 'out.npz'))
    (tmp_path / 't10k-images-idx3-ubyte').unlink()
    with pytest.raises(FileNotFoundError, match='t10k-images-idx3-ubyte'):
        load_data.load_data(str(tmp_path), str(tmp_path / 'out.npz'))


@pytest.mark.parametrize('make_data, message', [
    (lambda folder: str(folder / 'missing.npz'), 'no such file or folder'),
    (lambda folder: (folder / 'corrupt.npz').write_bytes(b'PK\x03\x04 not really a zip') and
     str(folder / 'corrupt.npz'), 'not an MNIST npz file or IDX folder (a broken zip archive: '),
    # Without its own check numpy would say "Cannot load file containing pickled data".
    (lambda folder: (folder / 'notes.npz').write_text('not data') and str(folder / 'notes.npz'),
     'notes.npz: not an MNIST npz file or IDX folder (not a zip archive); expected a Keras-layout .npz with the '
     'arrays x_train, y_train, x_test, y_test, or a folder of the four MNIST IDX files'),
    (lambda folder: write_idx(folder / 'train-images-idx3-ubyte.gz', np.zeros((2, 28, 28), np.uint8), compress=True)
     or str(folder / 'train-images-idx3-ubyte.gz'), 'if it is one IDX file, pass the folder that holds all four'),
    (lambda folder: bad_npz(folder / 'wrong.npz', x_test=np.zeros((5, 32, 32), np.uint8)), 'shape'),
])
def test_cli_data_errors_are_one_line_and_exit_1(tmp_path, make_data, message):
    process = run_script(MNIST_PY, '--data', make_data(tmp_path), '--epoch=5', '--export_dir', str(tmp_path / 'm'),
                         '--log_dir', '')
    assert process.returncode == 1
    assert 'Traceback' not in process.stderr
    assert process.stderr.count('\n') == 1 and message in process.stderr
    assert process.stderr.startswith('mnist.py: error: ')
    assert list((tmp_path / 'm').iterdir()) == [], 'nothing exported'


def test_cli_refuses_an_existing_version_before_training(model_base_dir):
    process = run_script(MNIST_PY, '--export_dir', model_base_dir, '--model_version=1')
    assert process.returncode == 1
    assert process.stderr.strip().endswith('already exists: choose another --model_version')
    assert 'step' not in process.stdout


@pytest.mark.parametrize('flag, value, allowed', [
    ('--num_hidden_layer_1', '0', 'an integer >= 1'),
    ('--num_hidden_layer_2', 'many', 'an integer >= 1'),
    ('--dropout', '0', 'a keep probability in (0, 1]'),
    ('--dropout', '1.5', 'a keep probability in (0, 1]'),
    ('--learning_rate', '-0.1', 'a number > 0'),
    ('--learning_rate', 'nan', 'a number > 0'),
    ('--epoch', '0', 'an integer >= 1'),
    ('--batch_size', '-1', 'an integer >= 1'),
    ('--seed', '-1', 'an integer >= 0'),
    ('--model_version', '0', 'an integer >= 1'),
])
def test_invalid_flags_are_argparse_errors_with_the_range(capsys, flag, value, allowed):
    with pytest.raises(SystemExit) as exit_info:
        mnist.main([f'{flag}={value}'])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f'mnist.py: error: argument {flag}: must be {allowed}, got {value!r}' in error


def test_help_documents_the_meanings():
    process = run_script(MNIST_PY, '--help')
    assert process.returncode == 0
    text = ' '.join(process.stdout.split())
    assert 'KEEP probability' in text and '1.0 disables dropout' in text
    assert 'number of training STEPS' in text


def test_shipped_test_digits_are_the_documented_mnist_digits():
    from PIL import Image

    with open(os.path.join(REPO, 'mnist_model', 'test_data', 'README.md')) as file:
        indices = dict(re.findall(r'\| (\d)\.png \| (\d+) \|', file.read()))
    with np.load(mnist.DEFAULT_DATA) as data:
        for digit in range(10):
            index = int(indices[str(digit)])
            image = Image.open(os.path.join(REPO, 'mnist_model', 'test_data', f'{digit}.png'))
            assert image.mode == 'L' and image.size == (28, 28)
            assert data['y_test'][index] == digit
            np.testing.assert_array_equal(np.asarray(image), data['x_test'][index])


def test_train_takes_a_plain_keras_npz_too_and_trains_exactly_epoch_steps(small_data_path, tmp_path):
    # 3000 examples make 11 whole batches of 256 a pass: 25 steps are two passes and part of a third.
    train.train(small_data_path, str(tmp_path / 'model'), num_hidden_layer_1=8, num_hidden_layer_2=8, epoch=25)
    with open(tmp_path / 'model' / 'train.json') as file:
        info = json.load(file)
    assert info['data_source'] == small_data_path and info['train_examples'] == 3000
    assert info['steps'] == 25, 'the optimizer took exactly --epoch steps'


@pytest.mark.parametrize('environment, threads', [({}, '1 1'), ({'TF_NUM_INTRAOP_THREADS': '2'}, '0 0')])
def test_train_runs_tensorflow_in_one_thread_unless_its_variables_say_otherwise(small_data_path, tmp_path,
                                                                                 environment, threads):
    # A fresh process, as TensorFlow's threads are fixed once it has run; '0 0' is TensorFlow's own choice (which
    # then reads the variable).
    code = ('import sys, train, tensorflow as tf; train.train(sys.argv[1], sys.argv[2], num_hidden_layer_1=8, '
            'num_hidden_layer_2=8, epoch=2); print(tf.config.threading.get_intra_op_parallelism_threads(), '
            'tf.config.threading.get_inter_op_parallelism_threads())')
    environment = {'TF_NUM_INTRAOP_THREADS': '', 'TF_NUM_INTEROP_THREADS': '', **environment}
    result = run_script('-c', code, small_data_path, str(tmp_path / 'model'), cwd=os.path.join(REPO, 'mnist_model'),
                        env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == threads


def test_cli_refuses_an_unwritable_export_folder_before_training(tmp_path):
    not_a_folder = tmp_path / 'file'
    not_a_folder.write_text('')
    process = run_script(MNIST_PY, '--export_dir', str(not_a_folder), '--log_dir', '')
    assert process.returncode == 1 and 'Traceback' not in process.stderr
    assert process.stderr.startswith(f'mnist.py: error: cannot write to {not_a_folder}')
    assert 'step' not in process.stdout


def test_predict_image_reads_thin_and_thick_pens_alike(model_base_dir):
    """predict_image brings strokes to MNIST's width: the drawings of tests/drawn_digits.json read as well with a
    4 px pen as with a 20 px one (before the width was normalised, a 4 px pen read 0.58 of them, 20 px 0.99)."""
    import tensorflow as tf

    drawings = drawn_digits.load_drawings()
    labels = np.array([drawing['digit'] for drawing in drawings])
    loaded = tf.saved_model.load(os.path.join(model_base_dir, '1'))
    accuracies = {}
    for pen_width in (4, 20):
        images = [drawn_digits.render_png(drawing['strokes'], pen_width) for drawing in drawings]
        digits = loaded.signatures['predict_image'](image_bytes=tf.constant(images))['digit'].numpy()
        accuracies[pen_width] = float(np.mean(digits == labels))
    # The small test model reads about 0.9 of them with either pen.
    assert min(accuracies.values()) >= 0.85, accuracies
    assert abs(accuracies[4] - accuracies[20]) <= 0.05, accuracies
