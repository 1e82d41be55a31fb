"""Train a two-hidden-layer MLP on MNIST, log it to TensorBoard and export a SavedModel that TF Serving loads.

Example (the demo's tuned values; run from the repository root or from inside mnist_model/):

    python3 mnist.py --num_hidden_layer_1=192 --num_hidden_layer_2=64 --dropout=0.4905680409621578 \
        --learning_rate=0.09105850855225119 --epoch=2000

The work is done by five step functions, run in this order: load_data -> train -> evaluate -> export (here) ->
promote (promote.py). Each step keeps its imports and helpers inside itself and passes data only as files (npz, a
model folder, JSON), because the KFP pipeline (mnist_pipeline.py) turns the very same functions into lightweight
components and the Katib trial (../mnist_hyper_tuning.py) calls them too: there is one definition of every step.
promote serves the new version only if its test accuracy is at least --min_accuracy and at least the served
version's (plus --min_improvement); --force_export overrides it, and `--retire N` takes version N out of service.

Meaning of the hyperparameters (the demo's names):
    --num_hidden_layer_1, --num_hidden_layer_2  units of the two hidden ReLU layers
    --dropout                                   KEEP probability of the dropout before the output layer (1.0 = none)
    --learning_rate                             peak learning rate of SGD with Nesterov momentum and cosine decay
    --epoch                                     number of training STEPS (mini-batches), not passes over the data

Serving contract of an exported version, <export_dir>/<version>/ (saved_model_cli show --all lists it):
    signature serving_default
        input   pixels         float32 [-1, 784]  raw grayscale 0-255, white digit on black, as in MNIST
        output  probabilities  float32 [-1, 10]
        output  digit          int64   [-1]
    signature predict_image
        input   image_bytes    string  [-1]       PNG or JPEG bytes (base64 {"b64": ...} over REST), gray/RGB/RGBA,
                                                  at most 4096 px a side (read from the header before
                                                  decoding), dark ink on light paper is inverted,
                                                  strokes thickened or thinned to MNIST's pen width
        outputs as serving_default
    signature image_pixels (for the drift monitor: what predict_image classifies)
        input   image_bytes    string  [-1]       as predict_image
        output  pixels         float32 [-1, 784]  the image after predict_image's preprocessing, 0-255
    assets.extra/run.json: hyperparameters, test accuracy and loss, training seconds, TensorFlow version, data
                           checksum, the version and the promotion decision (the baseline version and accuracy it
                           beat, or "forced").
    assets.extra/profile.json: the drift monitor's reference, what the model saw and said on the test set (drift.py).
Scaling happens inside the model: clients send pixels as the images hold them and never divide by 255.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    # The step functions' InputPath/OutputPath annotations stay strings at run time: mnist_pipeline.py resolves them
    # where kfp is loaded, and the trainer itself runs without importing kfp (41 MB less memory).
    from kfp.components import InputPath, OutputPath

try:
    from promote import PROMOTION_DEFAULTS, promote, retire
except ModuleNotFoundError:  # Imported from the repository's top folder as mnist_model.mnist (the Katib trial).
    from mnist_model.promote import PROMOTION_DEFAULTS, promote, retire

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, 'data', 'mnist.npz')
DEFAULT_LOG_DIR = os.path.join('~', 'tensorboard', 'notebook')
HYPERPARAMETER_DEFAULTS = {
    'num_hidden_layer_1': 128,
    'num_hidden_layer_2': 256,
    'dropout': 1.0,
    'learning_rate': 0.01,
    'epoch': 2000,
    'batch_size': 256,
    'seed': 0,
}


def load_data(data: str, dataset_path: OutputPath('npz')):
    """Read MNIST from a Keras-layout npz, a folder of the four IDX files or an http(s) URL of an npz, validate
    it and write it to dataset_path as an uncompressed npz of uint8 arrays (x_train y_train x_test y_test) plus
    the source and its sha256. Raises ValueError or FileNotFoundError with a one-line message."""
    import gzip
    import hashlib
    import io
    import os
    import urllib.request
    import zipfile

    import numpy as np

    keys = ('x_train', 'y_train', 'x_test', 'y_test')
    # The file names MNIST is distributed under, in the order of `keys`.
    idx_names = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte')

    def not_mnist(name, reason):
        return ValueError(f'{name}: not an MNIST npz file or IDX folder ({reason}); expected a Keras-layout .npz '
                          f'with the arrays {", ".join(keys)}, or a folder of the four MNIST IDX files')

    def read_npz(content, name):
        # An npz file is a zip archive. Anything else would reach numpy's pickle check and fail with a message about
        # pickled data that says nothing to someone who passed, say, a text file.
        if content[:2] != b'PK':
            if content[:3] == b'\x00\x00\x08':
                raise not_mnist(name, 'one IDX file: pass the folder that holds all four')
            if content[:2] == b'\x1f\x8b':
                raise not_mnist(name, 'a gzip file; if it is one IDX file, pass the folder that holds all four')
            raise not_mnist(name, 'not a zip archive')
        try:
            with np.load(io.BytesIO(content), allow_pickle=False) as npz:
                missing = [key for key in keys if key not in npz.files]
                if missing:
                    raise ValueError(f'{name}: missing arrays {", ".join(missing)} (expected {", ".join(keys)})')
                return [npz[key] for key in keys]
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise not_mnist(name, f'a broken zip archive: {error}') from None
        except ValueError as error:
            if str(error).startswith(name):
                raise
            raise not_mnist(name, f'an unreadable array: {error}') from None

    def read_idx(path):
        opener = gzip.open if path.endswith('.gz') else open
        try:
            with opener(path, 'rb') as file:
                content = file.read()
        except (OSError, EOFError) as error:
            raise ValueError(f'{path}: cannot read ({error})') from None
        # IDX header: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions, then the sizes.
        if len(content) < 4 or content[:3] != b'\x00\x00\x08' or content[3] not in (1, 3):
            raise ValueError(f'{path}: not an IDX file of unsigned bytes')
        ndim = content[3]
        header_size = 4 + 4 * ndim
        shape = [int.from_bytes(content[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
        values = np.frombuffer(content, dtype=np.uint8, offset=min(header_size, len(content)))
        if len(content) < header_size or values.size != int(np.prod(shape)):
            raise ValueError(f'{path}: truncated or corrupt IDX file (header says shape {shape})')
        return values.reshape(shape), content

    def find_idx(folder, name):
        for candidate in (name, name + '.gz', name.replace('-idx', '.idx'), name.replace('-idx', '.idx') + '.gz'):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
        raise FileNotFoundError(f'{folder}: no {name}[.gz] file (an IDX folder needs all four MNIST files)')

    if data.startswith(('http://', 'https://')):
        try:
            with urllib.request.urlopen(data, timeout=120) as response:
                content = response.read()
        except OSError as error:
            raise ValueError(f'cannot download {data} ({error})') from None
        arrays = read_npz(content, data)
        checksum = hashlib.sha256(content).hexdigest()
    elif os.path.isdir(data):
        arrays, digest = [], hashlib.sha256()
        for name in idx_names:
            array, content = read_idx(find_idx(data, name))
            arrays.append(array)
            digest.update(content)
        checksum = digest.hexdigest()
    elif os.path.isfile(data):
        with open(data, 'rb') as file:
            content = file.read()
        arrays = read_npz(content, data)
        checksum = hashlib.sha256(content).hexdigest()
    else:
        raise FileNotFoundError(f'{data}: no such file or folder')

    x_train, y_train, x_test, y_test = arrays
    for images, labels, split in ((x_train, y_train, 'train'), (x_test, y_test, 'test')):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(f'{data}: {split} images must be uint8 of shape (N, 28, 28), '
                             f'got {images.dtype} {images.shape}')
        if labels.ndim != 1 or labels.dtype.kind not in 'iu':
            raise ValueError(f'{data}: {split} labels must be a 1-D integer array, got {labels.dtype} {labels.shape}')
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f'{data}: {len(images)} {split} images but {len(labels)} labels')
        if labels.min() < 0 or labels.max() > 9:
            raise ValueError(f'{data}: {split} labels must be digits 0-9, found {labels.min()}..{labels.max()}')

    os.makedirs(os.path.dirname(os.path.abspath(dataset_path)), exist_ok=True)
    # An open file stops np.savez from appending ".npz" to a path KFP chose.
    with open(dataset_path, 'wb') as file:
        np.savez(file, x_train=x_train, y_train=y_train.astype(np.uint8), x_test=x_test,
                 y_test=y_test.astype(np.uint8), source=np.array(data), source_sha256=np.array(checksum))


def train(dataset_path: InputPath('npz'), model_path: OutputPath('Model'), num_hidden_layer_1: int = 128,
          num_hidden_layer_2: int = 256, dropout: float = 1.0, learning_rate: float = 0.01, epoch: int = 2000,
          batch_size: int = 256, seed: int = 0, log_dir: str = ''):
    """Train the MLP for `epoch` steps and save it to the folder model_path (model.keras and train.json).
    `dropout` is the keep probability. With a log_dir, write TensorBoard logs to <log_dir>/<run name>/.
    Returns the trained Keras model too, which a caller in the same process (run) hands to evaluate and export
    instead of loading model.keras again; a KFP component ignores it."""
    import datetime
    import itertools
    import json
    import math
    import os
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    # One thread for TensorFlow's operations, unless TensorFlow's own TF_NUM_INTRAOP_THREADS/TF_NUM_INTEROP_THREADS
    # say otherwise. The operations are small here (batches of 256 rows), and splitting each one across the cores
    # cost more than it gained: on the 2-core reference machine a step took 2.9 ms with TensorFlow's default (a
    # thread per core) and 2.3 ms with one, for the same figures (docs/trainer.md). It also leaves the other cores
    # to the tuner's parallel trials, and to the other pods of a node, whose cores TensorFlow would count as its own
    # whatever the pod's CPU limit.
    if not (os.environ.get('TF_NUM_INTRAOP_THREADS') or os.environ.get('TF_NUM_INTEROP_THREADS')):
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow has run in this process already (a notebook's second run): it keeps its own.
            pass
    log_every = 200  # Steps between progress lines, TensorBoard points and test passes.
    with np.load(dataset_path, allow_pickle=False) as dataset:
        x_train, y_train = dataset['x_train'].reshape(-1, 784), dataset['y_train']
        x_test, y_test = dataset['x_test'].reshape(-1, 784), dataset['y_test']
        # load_data records where the data came from; another Keras-layout npz is its own source.
        source = str(dataset['source']) if 'source' in dataset.files else dataset_path
        source_sha256 = str(dataset['source_sha256']) if 'source_sha256' in dataset.files else ''
    train_examples = len(x_train)

    keras.utils.set_random_seed(seed)
    # Standardise with the training set's statistics inside the model, so that it is fed raw 0-255 pixels.
    # A histogram of the 256 pixel values gives them exactly, without float copies of the whole set.
    counts = sum(np.bincount(chunk.ravel(), minlength=256) for chunk in np.array_split(x_train, 20))
    mean = float(np.dot(counts, np.arange(256)) / counts.sum())
    std = float(np.sqrt(np.dot(counts, (np.arange(256) - mean) ** 2) / counts.sum()))
    layers = [
        keras.Input(shape=(784,), name='pixels'),
        keras.layers.Rescaling(scale=1.0 / std, offset=-mean / std, name='standardise'),
        # Batch normalisation before each ReLU: with it the demo's tuned values reach 0.982 test accuracy in 2000
        # steps instead of 0.979 (median of seeds 0-2), for 5-15% more training time. It has its own offset, so
        # the dense layers need no bias.
        keras.layers.Dense(num_hidden_layer_1, use_bias=False, name='hidden_1'),
        keras.layers.BatchNormalization(name='normalise_1'),
        keras.layers.ReLU(name='relu_1'),
        keras.layers.Dense(num_hidden_layer_2, use_bias=False, name='hidden_2'),
        keras.layers.BatchNormalization(name='normalise_2'),
        keras.layers.ReLU(name='relu_2'),
    ]
    if dropout < 1.0:
        # One dropout before the classifier, as in TensorFlow's classic MNIST examples, where --dropout is also the
        # keep probability. Keras takes the fraction to DROP.
        layers.append(keras.layers.Dropout(1.0 - dropout, seed=seed, name='dropout'))
    layers.append(keras.layers.Dense(10, activation='softmax', name='probabilities'))
    model = keras.Sequential(layers, name='mnist_mlp')
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=epoch)
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    optimizer.build(model.trainable_variables)
    loss_function = keras.losses.SparseCategoricalCrossentropy()

    # Every pass over the training set is one seeded shuffle, cut into whole batches; the last `epoch` % batches-per-
    # pass steps use part of a pass, so that training stops after exactly `epoch` steps. The images stay uint8 in
    # memory (a float copy of the training set would take 188 MB) and each step gathers its own batch.
    batches_per_pass = train_examples // batch_size
    if batches_per_pass == 0:
        raise ValueError(f'batch size {batch_size} is larger than the {train_examples} training examples')
    images, labels = tf.constant(x_train), tf.constant(y_train.astype(np.int32))
    test_images, test_labels = tf.constant(x_test), tf.constant(y_test.astype(np.int32))
    del x_train

    def batches_in_order():
        """The indices of every batch's examples, batch after batch, pass after pass."""
        for pass_index in itertools.count():
            order = tf.random.experimental.stateless_shuffle(tf.range(train_examples, dtype=tf.int32),
                                                             seed=tf.constant([seed, pass_index], tf.int64))
            yield from order.numpy()[:batches_per_pass * batch_size].reshape(batches_per_pass, batch_size)

    def accuracy_of(probabilities, digits):
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(probabilities, axis=1, output_type=tf.int32), digits),
                                      tf.float32))

    # Keras' layers and optimizer are TensorFlow code already: AutoGraph need not convert them, which only slows
    # tracing.
    @tf.autograph.experimental.do_not_convert
    def train_step(batch):
        """One step of SGD on the training examples numbered `batch`; returns the batch's loss and accuracy."""
        pixels = tf.cast(tf.gather(images, batch), tf.float32)
        digits = tf.gather(labels, batch)
        with tf.GradientTape() as tape:
            probabilities = model(pixels, training=True)
            loss = loss_function(digits, probabilities)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss, accuracy_of(probabilities, digits)

    # One call of train_steps runs a whole log interval as a loop inside TensorFlow's graph: Python is not involved
    # between the steps. (XLA, jit_compile=True, ran the steady steps faster but changed the numbers: predict_image
    # read 0.9725 of the re-drawn digits instead of 0.975, and its compilation cost 2-5 s: docs/trainer.md.)
    @tf.function(input_signature=[tf.TensorSpec([None, batch_size], tf.int32)])
    def train_steps(batches):
        """One training step per row of `batches` (the numbers of a batch's examples); returns the mean loss and
        accuracy over those steps, as the model stood at each step."""
        loss_sum, accuracy_sum = tf.constant(0.0), tf.constant(0.0)
        for step in tf.range(tf.shape(batches)[0]):
            loss, accuracy = train_step(batches[step])
            loss_sum += loss
            accuracy_sum += accuracy
        steps = tf.cast(tf.shape(batches)[0], tf.float32)
        return loss_sum / steps, accuracy_sum / steps

    @tf.function(autograph=False)
    def test_metrics():
        """Loss and accuracy on the whole test set."""
        probabilities = model(tf.cast(test_images, tf.float32), training=False)
        return loss_function(test_labels, probabilities), accuracy_of(probabilities, test_labels)

    run_dir = None
    writers = {}
    if log_dir:
        run_name = (f'{datetime.datetime.now():%Y%m%d-%H%M%S}-h{num_hidden_layer_1}-{num_hidden_layer_2}'
                    f'-keep{dropout:.3g}-lr{learning_rate:.3g}-steps{epoch}-seed{seed}')
        run_dir = os.path.join(os.path.expanduser(log_dir), run_name)
        suffix = 1
        while os.path.exists(run_dir):
            suffix += 1
            run_dir = os.path.join(os.path.expanduser(log_dir), f'{run_name}-{suffix}')
        # One writer per series, created once for the whole run.
        writers = {name: tf.summary.create_file_writer(os.path.join(run_dir, name))
                   for name in ('train', 'validation')}

    # The training time counts the steps, the test passes and the logging between them, from the first step to the
    # last progress line, which shows the same figure.
    training_started = time.perf_counter()
    batches = batches_in_order()
    step = 0
    while step < epoch:
        interval = min(log_every, epoch - step)
        train_loss, train_accuracy = (float(value) for value in
                                      train_steps(np.stack([next(batches) for _ in range(interval)])))
        step += interval
        test_loss, test_accuracy = (float(value) for value in test_metrics())
        for series, loss, accuracy in (('train', train_loss, train_accuracy),
                                       ('validation', test_loss, test_accuracy)):
            if series in writers:
                with writers[series].as_default(step=step):
                    tf.summary.scalar('loss', loss)
                    tf.summary.scalar('accuracy', accuracy)
        train_seconds = round(time.perf_counter() - training_started, 3)
        print(f'step {step:>6}/{epoch}  train loss {train_loss:.4f} accuracy {train_accuracy:.4f}  '
              f'test loss {test_loss:.4f} accuracy {test_accuracy:.4f}  (training {train_seconds:.1f} s)', flush=True)
        if not math.isfinite(train_loss):
            for writer in writers.values():
                writer.close()
            raise ValueError(f'training diverged (loss {train_loss}); try a smaller --learning_rate')

    hyperparameters = {'num_hidden_layer_1': num_hidden_layer_1, 'num_hidden_layer_2': num_hidden_layer_2,
                       'dropout': dropout, 'learning_rate': learning_rate, 'epoch': epoch,
                       'batch_size': batch_size, 'seed': seed}
    if writers:
        probabilities = model(tf.cast(test_images, tf.float32), training=False).numpy()
        predictions = probabilities.argmax(axis=1)
        confusion = np.bincount(y_test.astype(np.int64) * 10 + predictions, minlength=100).reshape(10, 10)
        # matplotlib is imported here, on the only path that draws TensorBoard images: the pipeline runs this step in
        # the tensorflow/tensorflow image, which has no matplotlib, and passes no log_dir. The figures use
        # matplotlib's object API on an Agg canvas instead of pyplot, so no figure is registered anywhere (nothing to
        # close) and a notebook that calls train() keeps its own plotting backend.
        import io

        from matplotlib import colormaps, colors, style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.figure import Figure

        def to_image(figure):
            """The figure as a [1, height, width, 3] image, through PNG bytes as TensorFlow's recipe for logging a
            confusion matrix to TensorBoard does."""
            png = io.BytesIO()
            FigureCanvasAgg(figure).print_png(png)
            return tf.image.decode_png(png.getvalue(), channels=3)[None]

        def draw_confusion_matrix(confusion):
            # Right answers (the diagonal) are blue by the share of the digit recognised; mistakes are red on a scale
            # of their own, up to the most frequent one, so that even a few errors stand out from the white zeros.
            right = np.eye(10, dtype=bool)
            recall = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
            errors = np.where(right, 0, confusion)
            error_scale = colors.PowerNorm(0.5, vmin=0, vmax=max(int(errors.max()), 1))
            colours = colormaps['Reds'](error_scale(errors))
            colours[right] = colormaps['Blues'](0.3 + 0.6 * recall)
            colours[(errors == 0) & ~right] = (1.0, 1.0, 1.0, 1.0)
            figure = Figure(figsize=(5.4, 4.8), dpi=100, layout='constrained')
            axes = figure.add_subplot()
            axes.imshow(colours)
            for true_digit, predicted in np.ndindex(10, 10):
                count = confusion[true_digit, predicted]
                red, green, blue, _ = colours[true_digit, predicted]
                text_colour = ('white' if 0.299 * red + 0.587 * green + 0.114 * blue < 0.6
                               else 'black' if count else '#b0b0b0')
                axes.text(predicted, true_digit, str(count), ha='center', va='center', fontsize=10, color=text_colour)
            axes.set_xticks(range(10))
            axes.set_yticks(range(10))
            axes.tick_params(length=0)
            axes.set_xlabel('predicted digit', fontsize=11)
            axes.set_ylabel('true digit', fontsize=11)
            total = int(confusion.sum())
            axes.set_title(f'{total - int(errors.sum())} of {total} test digits right '
                           f'({1 - errors.sum() / max(total, 1):.2%})', fontsize=11)
            colour_bar = figure.colorbar(ScalarMappable(error_scale, 'Reds'), ax=axes, shrink=0.8)
            colour_bar.set_label('wrong predictions in a cell', fontsize=10)
            return figure

        def draw_mistakes(pixels, true_digits, probabilities, columns=4, rows=4):
            """The test digits predicted wrong, most confident first; returns the figure and their test indices."""
            predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
            wrong = np.flatnonzero(predicted != true_digits)
            shown = wrong[np.argsort(-confidence[wrong], kind='stable')][:columns * rows]
            rows = max(1, math.ceil(len(shown) / columns))
            figure = Figure(figsize=(columns * 1.5, rows * 1.45 + 0.3), dpi=100, layout='constrained')
            figure.suptitle(f'{len(wrong)} of {len(true_digits)} test digits wrong; '
                            f'{"the most confident mistakes" if len(shown) else "no mistakes"}', fontsize=11)
            for position, index in enumerate(shown):
                axes = figure.add_subplot(rows, columns, position + 1)
                # Dark ink on white paper, as people write digits (MNIST stores them light on dark).
                axes.imshow(pixels[index].reshape(28, 28), cmap='gray_r', vmin=0, vmax=255)
                # Rounded down, so that a mistake is never shown as 100% sure.
                percent = math.floor(100 * confidence[index])
                axes.set_title(f'true {true_digits[index]} -> {predicted[index]} ({percent}%)', fontsize=11)
                axes.set_axis_off()
            return figure, shown

        # Matplotlib's default style, whatever style the caller has set, so that every run draws the same pictures.
        with style.context('default'):
            matrix = to_image(draw_confusion_matrix(confusion))
            mistakes, shown = draw_mistakes(x_test, y_test, probabilities)
            mistakes = to_image(mistakes)
        with writers['validation'].as_default(step=epoch):
            tf.summary.image('confusion_matrix', matrix,
                             description='Test digits by true digit (rows) and predicted digit (columns).')
            tf.summary.image('wrong_predictions', mistakes,
                             description='Test digits the model got wrong, most confident mistakes first. Their '
                                         f'indices in the test set: {", ".join(str(index) for index in shown)}.')
        from tensorboard.plugins.hparams import api as hparams_api
        with tf.summary.create_file_writer(run_dir).as_default():
            hparams_api.hparams(hyperparameters, trial_id=os.path.basename(run_dir))
        for writer in writers.values():
            writer.close()

    os.makedirs(model_path, exist_ok=True)
    model.save(os.path.join(model_path, 'model.keras'))
    info = {'hyperparameters': hyperparameters, 'steps': int(optimizer.iterations.numpy()),
            'train_seconds': train_seconds,
            'tensorflow_version': tf.__version__, 'keras_version': keras.__version__,
            'data_source': source, 'data_sha256': source_sha256, 'train_examples': train_examples,
            'standardisation': {'mean': mean, 'std': std}, 'tensorboard_run_dir': run_dir}
    with open(os.path.join(model_path, 'train.json'), 'w') as file:
        json.dump(info, file, indent=2)
    return model


def evaluate(dataset_path: InputPath('npz'), model_path: InputPath('Model'), metrics_path: OutputPath('JSON'),
             mlpipeline_metrics_path: OutputPath('Metrics'), mlpipeline_ui_metadata_path: OutputPath('UI_metadata'),
             trained_model=None) -> NamedTuple('EvaluateOutputs', [('accuracy', float), ('loss', float)]):
    """Measure test accuracy (a fraction) and loss; write them with the confusion matrix to metrics_path, and as
    KFP v1 run metrics and UI metadata (a confusion matrix and a summary) for the pipeline's run page.
    trained_model is the model train() returned when the steps run in one process (run); without it the model is
    loaded from model_path. (It is not an input of the pipeline's component: files travel there.)"""
    import collections
    import json
    import os

    import keras
    import numpy as np

    with np.load(dataset_path, allow_pickle=False) as dataset:
        x_test, y_test = dataset['x_test'].reshape(-1, 784), dataset['y_test'].astype(np.int64)
    model = (trained_model if trained_model is not None
             else keras.models.load_model(os.path.join(model_path, 'model.keras')))
    with open(os.path.join(model_path, 'train.json')) as file:
        train_info = json.load(file)

    # Batch by batch, so that only one batch at a time is held as float32.
    probabilities = np.concatenate([np.asarray(model(x_test[start:start + 2000].astype(np.float32), training=False))
                                    for start in range(0, len(x_test), 2000)])
    predictions = probabilities.argmax(axis=1)
    accuracy = float(np.mean(predictions == y_test))
    # The same clipping as Keras' cross-entropy, so this equals model.evaluate's loss.
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y_test)), y_test], 1e-7, 1.0))))
    confusion = np.bincount(y_test * 10 + predictions, minlength=100).reshape(10, 10)

    def write_json(path, content):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as file:
            json.dump(content, file, indent=2)

    # The drift monitor's reference (issue 25): what the model saw and said on these test digits; export writes it
    # to assets.extra/profile.json. A KFP component of this step must carry drift.py beside this function.
    try:
        from drift import compute_profile
    except ModuleNotFoundError:  # imported from the repository's top folder as mnist_model.mnist (the Katib trial)
        from mnist_model.drift import compute_profile
    write_json(metrics_path, {'accuracy': accuracy, 'loss': loss, 'test_examples': len(y_test),
                              'confusion_matrix': confusion.tolist(),
                              'profile': compute_profile(x_test, probabilities)})
    write_json(mlpipeline_metrics_path, {'metrics': [
        {'name': 'accuracy', 'numberValue': round(100 * accuracy, 4), 'format': 'PERCENTAGE'},
        {'name': 'loss', 'numberValue': round(loss, 6), 'format': 'RAW'},
    ]})
    rows = '\n'.join(f'| {name} | {value} |' for name, value in train_info['hyperparameters'].items())
    summary = (f'## MNIST MLP\n\nTest accuracy **{accuracy:.2%}**, loss {loss:.4f} on {len(y_test)} test images.\n\n'
               f'| hyperparameter | value |\n|---|---|\n{rows}\n')
    write_json(mlpipeline_ui_metadata_path, {'outputs': [
        {'type': 'confusion_matrix', 'format': 'csv', 'storage': 'inline',
         'schema': [{'name': 'target', 'type': 'CATEGORY'}, {'name': 'predicted', 'type': 'CATEGORY'},
                    {'name': 'count', 'type': 'NUMBER'}],
         'labels': [str(digit) for digit in range(10)],
         'source': ''.join(f'{target},{predicted},{confusion[target, predicted]}\n'
                           for target in range(10) for predicted in range(10))},
        {'type': 'markdown', 'storage': 'inline', 'source': summary},
    ]})
    return collections.namedtuple('EvaluateOutputs', ['accuracy', 'loss'])(accuracy, loss)


def export(model_path: InputPath('Model'), metrics_path: InputPath('JSON'), export_dir: OutputPath('SavedModel'),
           trained_model=None):
    """Export the model as a SavedModel in the folder export_dir, with the signatures serving_default and
    predict_image (see the module docstring) and assets.extra/run.json. The export is a candidate: promote()
    decides whether it becomes a served version. trained_model: as in evaluate."""
    import json
    import os

    import keras
    import tensorflow as tf

    model = (trained_model if trained_model is not None
             else keras.models.load_model(os.path.join(model_path, 'model.keras')))
    with open(os.path.join(model_path, 'train.json')) as file:
        train_info = json.load(file)
    with open(metrics_path) as file:
        metrics = json.load(file)

    # MNIST's digits fill a 20 px box, drawn with strokes 1.9 to 3.3 px wide there (10th to 90th percentile of the
    # training digits, by stroke_width below). A pen stroke scaled into that box can be far thinner (a 4 px pen
    # across a 250 px digit becomes 0.3 px, a faint line the model has never seen) or thicker (a small digit drawn
    # with a fat pen becomes a blob), so strokes outside stroke_range are brought to its nearer end. The ranges
    # (1.9, 3.3), (2.4, 3.3), (2.0, 3.0) and (2.0, 3.6) read bench/draw_bench.py's drawings as well, within one
    # drawing; this one keeps the re-drawn MNIST test digits best (0.975 against 0.9735-0.975). The width is set at
    # work_box px, 4 times the box, where one step of 3x3 dilation or erosion changes it by 0.5 MNIST px.
    mnist_box, work_box = 20, 80
    # The largest image predict_image reads, in px a side: 4096x4096 takes about 0.5 GB and 0.8 s to read, and
    # images are read one at a time. A JPEG's size is in its frame header, after at most this many segments.
    max_image_side = 4096
    max_jpeg_segments = 1000
    stroke_range = (2.0, 3.3)
    max_width_steps = 8

    def crop_and_fit(ink, box):
        """Crop to the ink's bounding box and resize its longer side to `box` px, keeping the aspect ratio."""
        inked_rows = tf.where(tf.reduce_any(ink > 0.1 * 255.0, axis=1))[:, 0]
        inked_columns = tf.where(tf.reduce_any(ink > 0.1 * 255.0, axis=0))[:, 0]
        top, bottom = tf.reduce_min(inked_rows), tf.reduce_max(inked_rows) + 1
        left, right = tf.reduce_min(inked_columns), tf.reduce_max(inked_columns) + 1
        height, width = tf.cast(bottom - top, tf.float32), tf.cast(right - left, tf.float32)
        scale = box / tf.maximum(height, width)
        new_height = tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32))
        new_width = tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))
        fitted = tf.image.resize(ink[top:bottom, left:right, None], [new_height, new_width], antialias=True)
        return tf.clip_by_value(fitted[:, :, 0], 0.0, 255.0)

    def stroke_width(ink):
        """Mean stroke width in px: twice the ink's area over its outline's length (a stroke of width w and
        length l has area w*l and an outline of about 2*l), both measured on the gray levels."""
        share = tf.pad(ink / 255.0, [[1, 1], [1, 1]])
        down = share[1:, :-1] - share[:-1, :-1]
        across = share[:-1, 1:] - share[:-1, :-1]
        outline = tf.reduce_sum(tf.sqrt(down * down + across * across + 1e-12))
        return 2.0 * tf.reduce_sum(share) / tf.maximum(outline, 1e-6)

    def set_stroke_width(ink):
        """Dilate or erode the strokes of a digit fitted to work_box px until their width is in stroke_range."""
        ink = ink * 255.0 / tf.maximum(tf.reduce_max(ink), 1e-6)
        # Room for the widest dilation on every side.
        ink = tf.pad(ink, [[max_width_steps + 1, max_width_steps + 1]] * 2)[None, :, :, None]
        width = stroke_width(ink[0, :, :, 0]) * mnist_box / work_box
        low, high = stroke_range
        # Each step widens or narrows a stroke by 2 px at work_box, which is 0.5 px in the 20 px box.
        steps_to_widen = tf.clip_by_value(tf.round((low - width) / 0.5), 0.0, max_width_steps)
        steps_to_narrow = tf.clip_by_value(tf.round((width - high) / 0.5), 0.0, max_width_steps)

        def dilate(image, step):
            # Alternating a square and a cross keeps round pen tips round instead of growing them into squares.
            square = tf.nn.max_pool2d(image, 3, 1, 'SAME')
            cross = tf.maximum(tf.nn.max_pool2d(image, [1, 3], 1, 'SAME'), tf.nn.max_pool2d(image, [3, 1], 1, 'SAME'))
            return tf.where(step % 2 == 0, square, cross)

        def change_width(step, image):
            image = tf.cond(step < steps_to_widen, lambda: dilate(image, step),
                            lambda: -dilate(-image, step))
            return step + 1.0, image

        _, ink = tf.while_loop(lambda step, image: step < steps_to_widen + steps_to_narrow, change_width,
                               [tf.constant(0.0), ink])
        return ink[0, :, :, 0]

    def centre(digit):
        """Place a digit of at most 20x20 px in 28x28 with its centre of mass at the centre (14, 14), as MNIST
        does; return it as 784 pixels."""
        height, width = tf.shape(digit)[0], tf.shape(digit)[1]
        mass = tf.maximum(tf.reduce_sum(digit), 1e-6)
        centre_row = tf.reduce_sum(digit * tf.cast(tf.range(height), tf.float32)[:, None]) / mass
        centre_column = tf.reduce_sum(digit * tf.cast(tf.range(width), tf.float32)[None, :]) / mass
        pad_top = tf.clip_by_value(tf.cast(tf.round(14.0 - centre_row), tf.int32), 0, 28 - height)
        pad_left = tf.clip_by_value(tf.cast(tf.round(14.0 - centre_column), tf.int32), 0, 28 - width)
        placed = tf.pad(digit, [[pad_top, 28 - height - pad_top], [pad_left, 28 - width - pad_left]])
        return tf.reshape(placed, [784])

    def read_bytes(image_bytes, position, count):
        """`count` bytes of image_bytes from `position` as int64 values, zeros past its end (a truncated header then
        reads as a size of 0, which the check refuses)."""
        length = tf.cast(tf.strings.length(image_bytes), tf.int64)
        window = tf.strings.substr(image_bytes, tf.minimum(tf.cast(position, tf.int64), length),
                                   tf.constant(count, tf.int64))
        values = tf.cast(tf.io.decode_raw(window, tf.uint8), tf.int64)
        return tf.pad(values, [[0, count - tf.shape(values)[0]]])

    def jpeg_size(image_bytes):
        """(width, height) from a JPEG's frame header (SOFn), found by walking the segments before it; (0, 0) if
        there is none within max_jpeg_segments segments."""
        def walk(position, segments, width, height):
            header = read_bytes(image_bytes, position, 9)
            marker = header[1]
            is_frame = (header[0] == 0xFF) & (marker >= 0xC0) & (marker <= 0xCF) & (marker != 0xC4) & (
                marker != 0xC8) & (marker != 0xCC)
            # A fill byte (0xFF) or a marker without a length (SOI, TEMn, RSTn) takes 1 or 2 bytes, the others
            # carry their length; anything else (no 0xFF, the scan or the end before a frame) ends the walk.
            step = tf.where(marker == 0xFF, tf.constant(1, tf.int64),
                            tf.where((marker == 0x01) | ((marker >= 0xD0) & (marker <= 0xD8)), tf.constant(2, tf.int64),
                                     2 + header[2] * 256 + header[3]))
            stop = is_frame | (header[0] != 0xFF) | (marker == 0xD9) | (marker == 0xDA)
            return (tf.where(stop, tf.constant(-1, tf.int64), position + step),
                    segments + 1,
                    tf.where(is_frame, header[7] * 256 + header[8], width),
                    tf.where(is_frame, header[5] * 256 + header[6], height))

        _, _, width, height = tf.while_loop(
            lambda position, segments, width, height: (position >= 0) & (segments < max_jpeg_segments), walk,
            [tf.constant(2, tf.int64), tf.constant(0), tf.constant(0, tf.int64), tf.constant(0, tf.int64)])
        return width, height

    def png_size(image_bytes):
        """(width, height) from a PNG's IHDR chunk, which the format requires to come first."""
        header = read_bytes(image_bytes, 16, 8)
        width = ((header[0] * 256 + header[1]) * 256 + header[2]) * 256 + header[3]
        height = ((header[4] * 256 + header[5]) * 256 + header[6]) * 256 + header[7]
        return width, height

    def check_image(image_bytes):
        """Assertions that the bytes are a PNG or JPEG whose header says at most max_image_side px a side: decoding
        a small file can take gigabytes (an 80 KB PNG of 8000x8000 zeros decodes to 2.3 GB), so the size is read
        from the header before anything is decoded."""
        is_png = tf.strings.substr(image_bytes, 0, 8) == b'\x89PNG\r\n\x1a\n'
        is_jpeg = tf.io.is_jpeg(image_bytes)
        known = tf.debugging.Assert(is_png | is_jpeg, [
            'image_bytes: not a PNG or JPEG image (predict_image reads PNG and JPEG)'])
        with tf.control_dependencies([known]):
            width, height = tf.cond(is_png, lambda: png_size(image_bytes), lambda: jpeg_size(image_bytes))
        fits = (width >= 1) & (height >= 1) & (width <= max_image_side) & (height <= max_image_side)
        message = tf.strings.format(
            'image_bytes: the image header says {}x{} px; predict_image reads images of 1 to ' + str(max_image_side)
            + ' px a side', [width, height], summarize=-1)
        return [tf.debugging.Assert(fits, [message])]

    def to_mnist_pixels(image_bytes):
        """Decode one image and normalise it the way MNIST was made, returning 784 pixels of 0-255."""
        with tf.control_dependencies(check_image(image_bytes)):
            # The decoders below read these bytes, so they run only once the size check has passed.
            image_bytes = tf.identity(image_bytes)
        # JPEG has no alpha channel: add an opaque one, so that every image is RGBA from here on.
        rgba = tf.cond(
            tf.io.is_jpeg(image_bytes),
            lambda: tf.pad(tf.io.decode_jpeg(image_bytes, channels=3), [[0, 0], [0, 0], [0, 1]], constant_values=255),
            lambda: tf.io.decode_png(image_bytes, channels=4))
        rgba = tf.cast(rgba, tf.float32)
        alpha = rgba[:, :, 3] / 255.0
        # Transparent parts count as white paper.
        gray = tf.image.rgb_to_grayscale(rgba[:, :, :3])[:, :, 0] * alpha + 255.0 * (1.0 - alpha)
        border = tf.concat([gray[0, :], gray[-1, :], gray[:, 0], gray[:, -1]], axis=0)
        background = tf.reduce_mean(border)
        # MNIST is a light digit on a dark background: invert dark ink on light paper.
        gray = tf.cond(background > 127.5, lambda: 255.0 - gray, lambda: gray)
        background = tf.minimum(background, 255.0 - background)
        ink = tf.nn.relu(gray - background)
        ink = ink * 255.0 / tf.maximum(tf.reduce_max(ink), 1e-6)
        # Fit the digit to the working size, bring its strokes to MNIST's width there, then fit it to MNIST's box.
        return tf.cond(tf.reduce_any(ink > 0.1 * 255.0),
                       lambda: centre(crop_and_fit(set_stroke_width(crop_and_fit(ink, work_box)), mnist_box)),
                       lambda: tf.zeros([784], tf.float32))

    # The serving functions are TensorFlow ops with explicit tf.cond and tf.while_loop, so they are traced without
    # AutoGraph: converting every helper above took most of an export's time.
    @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32, name='pixels')], autograph=False)
    def serve_pixels(pixels):
        probabilities = model(pixels, training=False)
        return {'probabilities': probabilities, 'digit': tf.argmax(probabilities, axis=1, output_type=tf.int64)}

    # What predict_image classifies; a signature of its own for the drift monitor (docs/monitoring.md).
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')], autograph=False)
    def image_pixels(image_bytes):
        # One image at a time (map_fn runs 10 at once in a graph): a batch of large images costs the memory of one.
        return {'pixels': tf.map_fn(to_mnist_pixels, image_bytes, fn_output_signature=tf.TensorSpec([784], tf.float32),
                                    parallel_iterations=1)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')], autograph=False)
    def serve_image(image_bytes):
        return serve_pixels(image_pixels(image_bytes)['pixels'])

    # The module carries only the model's variables; the signatures are the two functions, traced once each. (As
    # tf.function attributes of the module they would be traced a second time when saved: 1.3 s more per export.)
    serving = tf.Module()
    serving.model = model
    tf.saved_model.save(serving, export_dir, signatures={
        'serving_default': serve_pixels.get_concrete_function(),
        'predict_image': serve_image.get_concrete_function(),
        'image_pixels': image_pixels.get_concrete_function()})
    os.makedirs(os.path.join(export_dir, 'assets.extra'), exist_ok=True)
    if 'profile' in metrics:
        # The drift monitor's reference (drift.py, docs/monitoring.md): evaluate measured the raw pixels; what
        # predict_image makes of test digits sent as PNG is measured here, where its preprocessing exists.
        try:
            from drift import complete_profile, write_profile
        except ModuleNotFoundError:  # imported from the repository's top folder as mnist_model.mnist
            from mnist_model.drift import complete_profile, write_profile

        def classify_images(digits):
            pixels = image_pixels(tf.stack([tf.io.encode_png(digit[..., None]) for digit in digits]))['pixels']
            return pixels.numpy(), serve_pixels(pixels)['probabilities'].numpy()

        write_profile(export_dir, complete_profile(metrics['profile'], classify_images))
    run_info = {'hyperparameters': train_info['hyperparameters'], 'accuracy': metrics['accuracy'],
                'loss': metrics['loss'], 'test_examples': metrics['test_examples'],
                'train_seconds': train_info['train_seconds'], 'tensorflow_version': tf.__version__,
                'data_source': train_info['data_source'], 'data_sha256': train_info['data_sha256']}
    with open(os.path.join(export_dir, 'assets.extra', 'run.json'), 'w') as file:
        json.dump(run_info, file, indent=2)


def run(data, hparams, log_dir='', export_dir=None, model_version=0, rule=None):
    """Run load_data -> train -> evaluate [-> export -> promote into export_dir] in a temporary folder and return
    the results as a dict. rule holds promote()'s min_accuracy, min_improvement and force_export."""
    import json

    hparams = {**HYPERPARAMETER_DEFAULTS, **hparams}
    with tempfile.TemporaryDirectory(prefix='mnist-') as work_dir:
        def path(name):
            return os.path.join(work_dir, name)

        load_data(data, path('dataset.npz'))
        # The same files as the pipeline's steps pass, and the trained model in memory besides.
        model = train(path('dataset.npz'), path('model'), log_dir=log_dir, **hparams)
        accuracy, loss = evaluate(path('dataset.npz'), path('model'), path('metrics.json'),
                                  path('evaluate-kfp-metrics.json'), path('evaluate-kfp-ui-metadata.json'),
                                  trained_model=model)
        with open(path('model/train.json')) as file:
            train_info = json.load(file)
        promotion = None
        if export_dir:
            export(path('model'), path('metrics.json'), path('export'), trained_model=model)
            promotion = promote(path('export'), export_dir, path('promote-kfp-metrics.json'),
                                path('promote-kfp-ui-metadata.json'), model_version=model_version,
                                **{**PROMOTION_DEFAULTS, **(rule or {})})
    version = promotion.model_version if promotion else None
    return {'accuracy': accuracy, 'loss': loss, 'promoted': bool(promotion and promotion.promoted),
            'decision': promotion.decision if promotion else None, 'model_version': version or None,
            'model_path': os.path.join(export_dir, str(version)) if version else None,
            'run_dir': train_info['tensorboard_run_dir'], 'train_seconds': train_info['train_seconds']}


def warn_if_near_chance(accuracy, learning_rate, epoch, prefix='mnist.py: '):
    """Print a warning to stderr when the test accuracy is near chance (<= 0.2; guessing one of ten digits scores
    0.1): training did not learn. The run still succeeds, because a Katib trial must record its result however poor."""
    if accuracy > 0.2:
        return
    # The trainer's progress lines come every 200 steps; a run shorter than that may simply have stopped too early.
    too_short = f', or --epoch {epoch} is too few steps' if epoch < 200 else ''
    print(f'{prefix}warning: test accuracy {accuracy:.4f} is near chance (0.1), so the model did not learn: '
          f'--learning_rate {learning_rate:g} is probably too high{too_short}', file=sys.stderr, flush=True)


def format_metrics(accuracy, loss):
    """The metric lines Katib's StdOut collector parses (and the only lines that name accuracy and loss so)."""
    return f'accuracy={accuracy:.6f}\nloss={loss:.6f}'


def _checked(convert, allowed, is_valid):
    """An argparse type that converts a value and names the allowed range when it is out of it."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):
            raise argparse.ArgumentTypeError(f'must be {allowed}, got {text!r}')
        return value
    return parse


positive_int = _checked(int, 'an integer >= 1', lambda value: value >= 1)
keep_probability = _checked(float, 'a keep probability in (0, 1]', lambda value: 0.0 < value <= 1.0)
positive_float = _checked(float, 'a number > 0', lambda value: 0.0 < value < float('inf'))
non_negative_int = _checked(int, 'an integer >= 0', lambda value: value >= 0)
accuracy_floor = _checked(float, 'a test accuracy in [0, 1]', lambda value: 0.0 <= value <= 1.0)
non_negative_float = _checked(float, 'a number >= 0', lambda value: 0.0 <= value < float('inf'))


def add_hyperparameter_arguments(parser):
    """Add the five hyperparameters and --batch_size, --seed, --data: shared by this script and the Katib trial."""
    defaults = HYPERPARAMETER_DEFAULTS
    parser.add_argument('--num_hidden_layer_1', type=positive_int, default=defaults['num_hidden_layer_1'],
                        help='units in the first hidden ReLU layer, >= 1 (default: %(default)s)')
    parser.add_argument('--num_hidden_layer_2', type=positive_int, default=defaults['num_hidden_layer_2'],
                        help='units in the second hidden ReLU layer, >= 1 (default: %(default)s)')
    parser.add_argument('--dropout', type=keep_probability, default=defaults['dropout'],
                        help='KEEP probability of the dropout before the output layer, in (0, 1]; '
                             '1.0 disables dropout (default: %(default)s)')
    parser.add_argument('--learning_rate', type=positive_float, default=defaults['learning_rate'],
                        help='peak learning rate of SGD with Nesterov momentum 0.9 and cosine decay, > 0 '
                             '(default: %(default)s)')
    parser.add_argument('--epoch', type=positive_int, default=defaults['epoch'],
                        help='number of training STEPS (mini-batches, not passes over the data), >= 1 '
                             '(default: %(default)s)')
    parser.add_argument('--batch_size', type=positive_int, default=defaults['batch_size'],
                        help='examples per training step, >= 1 (default: %(default)s)')
    parser.add_argument('--seed', type=non_negative_int, default=defaults['seed'],
                        help='random seed for initial weights, shuffling and dropout, >= 0 (default: %(default)s)')
    parser.add_argument('--data', default=DEFAULT_DATA,
                        help='Keras-layout mnist.npz, or a folder of the four MNIST IDX files (gzipped or not) '
                             '(default: the bundled data/mnist.npz)')


def hyperparameters_from(args):
    """The hyperparameter values of parsed arguments, as the dict run() takes."""
    return {name: getattr(args, name) for name in HYPERPARAMETER_DEFAULTS}


def add_promotion_arguments(parser):
    """Add the promotion rule's flags (see promote): shared by this script, the Katib trial and the pipeline."""
    parser.add_argument('--min_accuracy', type=accuracy_floor, default=PROMOTION_DEFAULTS['min_accuracy'],
                        help='promote only a model whose test accuracy is at least this, in [0, 1] '
                             '(default: %(default)s)')
    parser.add_argument('--min_improvement', type=non_negative_float, default=PROMOTION_DEFAULTS['min_improvement'],
                        help='promote only a model whose test accuracy is at least the served version\'s plus this, '
                             '>= 0; 0 promotes a tie (default: %(default)s)')
    parser.add_argument('--force_export', action='store_true',
                        help='export as a new version regardless of the promotion rule')


def promotion_rule_from(args):
    """The promotion settings of parsed arguments, as the dict run() takes as its rule."""
    return {name: getattr(args, name) for name in PROMOTION_DEFAULTS}


def main(argv=None):
    parser = argparse.ArgumentParser(prog='mnist.py', description=__doc__.split('\n\n')[0])
    add_hyperparameter_arguments(parser)
    parser.add_argument('--log_dir', default=DEFAULT_LOG_DIR,
                        help='TensorBoard folder; each run gets a subfolder; empty to disable (default: %(default)s)')
    parser.add_argument('--export_dir', default=HERE,
                        help='folder of the model versions, which TF Serving polls; empty to train without exporting '
                             '(default: this script\'s folder)')
    parser.add_argument('--model_version', type=positive_int, default=0,
                        help='integer version to export as (default: one more than any version there or retired)')
    add_promotion_arguments(parser)
    parser.add_argument('--retire', type=positive_int, metavar='N',
                        help='instead of training: take version N out of service (renamed to a hidden '
                             '.retired-N-<time> folder in --export_dir), so the previous version is served again')
    args = parser.parse_args(argv)
    if args.retire is not None:
        others = [f'--{name}' for name, value in vars(args).items()
                  if name not in ('retire', 'export_dir') and value != parser.get_default(name)]
        if others:
            parser.error(f'--retire takes only --export_dir, not {others[0]}')
        try:
            hidden_name, served, was_served = retire(args.export_dir, args.retire)
        except (ValueError, OSError) as error:
            print(f'mnist.py: error: {error}', file=sys.stderr)
            return 1
        # The version named is the one servers load now: the largest loadable one left.
        now = ('no loadable version is left to serve' if served is None
               else f'version {served} is served again (servers switch within their poll interval)' if was_served
               else f'version {served} stays in service')
        print(f'Retired version {args.retire}: renamed to {os.path.join(args.export_dir, hidden_name)}; {now}.')
        return 0

    if not args.export_dir and promotion_rule_from(args) != PROMOTION_DEFAULTS:
        parser.error('--min_accuracy, --min_improvement and --force_export apply to an export: --export_dir is empty')

    # TensorFlow's start-up notices say nothing the user can act on.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    # Fail before training, not after it, on folders that cannot take the results.
    version_dir = os.path.join(args.export_dir, str(args.model_version))
    if args.model_version and os.path.exists(version_dir):
        print(f'mnist.py: error: {version_dir} already exists: choose another --model_version', file=sys.stderr)
        return 1
    for folder in (args.export_dir, os.path.expanduser(args.log_dir)):
        try:
            if folder:
                os.makedirs(folder, exist_ok=True)
                if not os.access(folder, os.W_OK):
                    raise PermissionError(f'{folder} is not writable')
        except OSError as error:
            print(f'mnist.py: error: cannot write to {folder}: {error}', file=sys.stderr)
            return 1
    try:
        result = run(args.data, hyperparameters_from(args), log_dir=args.log_dir, export_dir=args.export_dir,
                     model_version=args.model_version, rule=promotion_rule_from(args))
    except (ValueError, OSError) as error:
        print(f'mnist.py: error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # promote says itself whether it had promoted the version when the interrupt came.
        print('mnist.py: interrupted', file=sys.stderr)
        return 130

    print(f'\nTest accuracy {result["accuracy"]:.4f}, loss {result["loss"]:.4f} '
          f'(training took {result["train_seconds"]:.1f} s)')
    if result['run_dir']:
        print(f'TensorBoard logs: {result["run_dir"]}  (view: tensorboard --logdir {args.log_dir})')
    if not args.export_dir:
        print('Model not exported (--export_dir is empty)')
    print(format_metrics(result['accuracy'], result['loss']), flush=True)
    warn_if_near_chance(result['accuracy'], args.learning_rate, args.epoch)
    return 0


if __name__ == '__main__':
    sys.exit(main())
