"""The second step: train the two-hidden-layer MLP on MNIST, log it to TensorBoard, and save it for the next steps.

train() reads the dataset npz that load_data wrote and saves model.keras and train.json into a folder. The model
standardises raw 0-255 pixels itself, so that it is fed pixels as the images hold them. The KFP components embed this
module's source verbatim (mnist_pipeline.py, mnist_pipeline_v2.py).

    python3 -c "import train; train.train('/tmp/dataset.npz', '/tmp/model', epoch=200)"   # from mnist_model/
"""
from __future__ import annotations

import datetime
import io
import itertools
import json
import math
import os
import time
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    # As in load_data.py: the kfp annotations stay strings at run time.
    from kfp.components import InputPath, OutputPath

LOG_EVERY = 200  # Steps between progress lines, TensorBoard points and test passes.


def use_one_thread():
    """One thread for TensorFlow's operations, unless TensorFlow's own TF_NUM_INTRAOP_THREADS/TF_NUM_INTEROP_THREADS
    say otherwise. The operations are small here (batches of 256 rows), and splitting each one across the cores cost
    more than it gained: on the 2-core reference machine a step took 2.9 ms with TensorFlow's default (a thread per
    core) and 2.3 ms with one, for the same figures (docs/trainer.md). It also leaves the other cores to the tuner's
    parallel trials, and to the other pods of a node, whose cores TensorFlow would count as its own whatever the pod's
    CPU limit."""
    if os.environ.get('TF_NUM_INTRAOP_THREADS') or os.environ.get('TF_NUM_INTEROP_THREADS'):
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow has run in this process already (a notebook's second run): it keeps its own.
        pass


def read_dataset(dataset_path):
    """The training and test arrays (images as rows of 784 pixels) and where the data came from."""
    with np.load(dataset_path, allow_pickle=False) as dataset:
        arrays = {'x_train': dataset['x_train'].reshape(-1, 784), 'y_train': dataset['y_train'],
                  'x_test': dataset['x_test'].reshape(-1, 784), 'y_test': dataset['y_test'],
                  # load_data records where the data came from; another Keras-layout npz is its own source.
                  'source': str(dataset['source']) if 'source' in dataset.files else dataset_path,
                  'source_sha256': str(dataset['source_sha256']) if 'source_sha256' in dataset.files else ''}
    return arrays


def pixel_statistics(x_train):
    """The mean and standard deviation of the training pixels. A histogram of the 256 pixel values gives them
    exactly, without float copies of the whole set."""
    counts = sum(np.bincount(chunk.ravel(), minlength=256) for chunk in np.array_split(x_train, 20))
    mean = float(np.dot(counts, np.arange(256)) / counts.sum())
    std = float(np.sqrt(np.dot(counts, (np.arange(256) - mean) ** 2) / counts.sum()))
    return mean, std


def build_model(num_hidden_layer_1, num_hidden_layer_2, dropout, seed, statistics):
    """The MLP, fed raw 0-255 pixels: it standardises them with the training set's statistics (mean, std) itself."""
    mean, std = statistics
    layers = [
        keras.Input(shape=(784,), name='pixels'),
        keras.layers.Rescaling(scale=1.0 / std, offset=-mean / std, name='standardise'),
        # Batch normalisation before each ReLU: with it the demo's tuned values reach 0.982 test accuracy in 2000
        # steps instead of 0.979 (median of seeds 0-2), for 5-15% more training time. It has its own offset, so the
        # dense layers need no bias.
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
    return keras.Sequential(layers, name='mnist_mlp')


def batches_in_order(train_examples, batch_size, seed):
    """The indices of every batch's examples, batch after batch, pass after pass. Every pass over the training set is
    one seeded shuffle, cut into whole batches; the last `epoch` % batches-per-pass steps use part of a pass, so that
    training stops after exactly `epoch` steps."""
    batches_per_pass = train_examples // batch_size
    for pass_index in itertools.count():
        order = tf.random.experimental.stateless_shuffle(tf.range(train_examples, dtype=tf.int32),
                                                         seed=tf.constant([seed, pass_index], tf.int64))
        yield from order.numpy()[:batches_per_pass * batch_size].reshape(batches_per_pass, batch_size)


def accuracy_of(probabilities, digits):
    return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(probabilities, axis=1, output_type=tf.int32), digits),
                                  tf.float32))


def make_training_loop(model, optimizer, loss_function, images, labels, batch_size):
    """A function that runs one training step per row of `batches` (the numbers of a batch's examples) and returns
    the mean loss and accuracy over those steps, as the model stood at each step. One call runs a whole log interval
    as a loop inside TensorFlow's graph: Python is not involved between the steps. (XLA, jit_compile=True, ran the
    steady steps faster but changed the numbers: predict_image read 0.9725 of the re-drawn digits instead of 0.975,
    and its compilation cost 2-5 s: docs/trainer.md.)"""
    # Keras' layers and optimizer are TensorFlow code already: AutoGraph need not convert them, which only slows
    # tracing.
    @tf.autograph.experimental.do_not_convert
    def train_step(batch):
        pixels = tf.cast(tf.gather(images, batch), tf.float32)
        digits = tf.gather(labels, batch)
        with tf.GradientTape() as tape:
            probabilities = model(pixels, training=True)
            loss = loss_function(digits, probabilities)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss, accuracy_of(probabilities, digits)

    @tf.function(input_signature=[tf.TensorSpec([None, batch_size], tf.int32)])
    def train_steps(batches):
        loss_sum, accuracy_sum = tf.constant(0.0), tf.constant(0.0)
        for step in tf.range(tf.shape(batches)[0]):
            loss, accuracy = train_step(batches[step])
            loss_sum += loss
            accuracy_sum += accuracy
        steps = tf.cast(tf.shape(batches)[0], tf.float32)
        return loss_sum / steps, accuracy_sum / steps

    return train_steps


def make_test_pass(model, loss_function, test_images, test_labels):
    """A function returning the loss and accuracy on the whole test set."""
    @tf.function(autograph=False)
    def test_metrics():
        probabilities = model(tf.cast(test_images, tf.float32), training=False)
        return loss_function(test_labels, probabilities), accuracy_of(probabilities, test_labels)

    return test_metrics


def open_writers(log_dir, run_name):
    """The run's TensorBoard folder <log_dir>/<run_name>[-N] and one writer per series, created once for the run."""
    run_dir = os.path.join(os.path.expanduser(log_dir), run_name)
    suffix = 1
    while os.path.exists(run_dir):
        suffix += 1
        run_dir = os.path.join(os.path.expanduser(log_dir), f'{run_name}-{suffix}')
    return run_dir, {name: tf.summary.create_file_writer(os.path.join(run_dir, name))
                     for name in ('train', 'validation')}


def log_scalars(writers, step, train_metrics, test_metrics):
    """One TensorBoard point of loss and accuracy per series; writers may be empty (no logs)."""
    for series, (loss, accuracy) in (('train', train_metrics), ('validation', test_metrics)):
        if series in writers:
            with writers[series].as_default(step=step):
                tf.summary.scalar('loss', loss)
                tf.summary.scalar('accuracy', accuracy)


def to_image(figure):
    """The figure as a [1, height, width, 3] image, through PNG bytes as TensorFlow's recipe for logging a confusion
    matrix to TensorBoard does."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    png = io.BytesIO()
    FigureCanvasAgg(figure).print_png(png)
    return tf.image.decode_png(png.getvalue(), channels=3)[None]


def confusion_colours(confusion):
    """The colour of each cell: right answers (the diagonal) are blue by the share of the digit recognised; mistakes
    are red on a scale of their own, up to the most frequent one, so that even a few errors stand out from the white
    zeros. Returns the colours and the mistakes' scale."""
    from matplotlib import colormaps, colors

    right = np.eye(10, dtype=bool)
    recall = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    errors = np.where(right, 0, confusion)
    error_scale = colors.PowerNorm(0.5, vmin=0, vmax=max(int(errors.max()), 1))
    colours = colormaps['Reds'](error_scale(errors))
    colours[right] = colormaps['Blues'](0.3 + 0.6 * recall)
    colours[(errors == 0) & ~right] = (1.0, 1.0, 1.0, 1.0)
    return colours, error_scale


def draw_confusion_matrix(confusion):
    """The confusion matrix with a count in every cell, as a matplotlib figure."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    colours, error_scale = confusion_colours(confusion)
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
    total, wrong = int(confusion.sum()), int(confusion.sum() - confusion.trace())
    axes.set_title(f'{total - wrong} of {total} test digits right ({1 - wrong / max(total, 1):.2%})', fontsize=11)
    colour_bar = figure.colorbar(ScalarMappable(error_scale, 'Reds'), ax=axes, shrink=0.8)
    colour_bar.set_label('wrong predictions in a cell', fontsize=10)
    return figure


def draw_mistakes(pixels, true_digits, probabilities, columns=4, rows=4):
    """The test digits predicted wrong, most confident first; returns the figure and their test indices."""
    from matplotlib.figure import Figure

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


def log_figures(writers, run_dir, model, test_set, hyperparameters):
    """The confusion matrix, the most confident mistakes and the hyperparameters, for TensorBoard's Images and HParams
    tabs. matplotlib is imported here, on the only path that draws TensorBoard images: the pipeline runs this step in
    the tensorflow/tensorflow image, which has no matplotlib, and passes no log_dir. The figures use matplotlib's object
    API on an Agg canvas instead of pyplot, so no figure is registered anywhere (nothing to close) and a notebook that
    calls train() keeps its own plotting backend."""
    from matplotlib import style
    from tensorboard.plugins.hparams import api as hparams_api

    x_test, y_test = test_set
    probabilities = model(tf.cast(x_test, tf.float32), training=False).numpy()
    predictions = probabilities.argmax(axis=1)
    confusion = np.bincount(y_test.astype(np.int64) * 10 + predictions, minlength=100).reshape(10, 10)
    # Matplotlib's default style, whatever style the caller has set, so that every run draws the same pictures.
    with style.context('default'):
        matrix = to_image(draw_confusion_matrix(confusion))
        mistakes, shown = draw_mistakes(x_test, y_test, probabilities)
        mistakes = to_image(mistakes)
    with writers['validation'].as_default(step=hyperparameters['epoch']):
        tf.summary.image('confusion_matrix', matrix,
                         description='Test digits by true digit (rows) and predicted digit (columns).')
        tf.summary.image('wrong_predictions', mistakes,
                         description='Test digits the model got wrong, most confident mistakes first. Their '
                                     f'indices in the test set: {", ".join(str(index) for index in shown)}.')
    with tf.summary.create_file_writer(run_dir).as_default():
        hparams_api.hparams(hyperparameters, trial_id=os.path.basename(run_dir))


def close_writers(writers):
    for writer in writers.values():
        writer.close()


def run_training(train_steps, test_metrics, writers, epoch, batches):
    """Train for `epoch` steps, a log interval at a time: a progress line, TensorBoard points and a test pass after
    each. The training time counts the steps, the test passes and the logging between them, from the first step to
    the last progress line, which shows the same figure. Returns it in seconds."""
    training_started = time.perf_counter()
    step = 0
    while step < epoch:
        interval = min(LOG_EVERY, epoch - step)
        train_loss, train_accuracy = (float(value) for value in
                                      train_steps(np.stack([next(batches) for _ in range(interval)])))
        step += interval
        test_loss, test_accuracy = (float(value) for value in test_metrics())
        log_scalars(writers, step, (train_loss, train_accuracy), (test_loss, test_accuracy))
        train_seconds = round(time.perf_counter() - training_started, 3)
        print(f'step {step:>6}/{epoch}  train loss {train_loss:.4f} accuracy {train_accuracy:.4f}  '
              f'test loss {test_loss:.4f} accuracy {test_accuracy:.4f}  (training {train_seconds:.1f} s)', flush=True)
        if not math.isfinite(train_loss):
            close_writers(writers)
            raise ValueError(f'training diverged (loss {train_loss}); try a smaller --learning_rate')
    return train_seconds


def save(model, model_path, info):
    """model.keras and train.json (what was trained, how, on which data) into the folder model_path."""
    os.makedirs(model_path, exist_ok=True)
    model.save(os.path.join(model_path, 'model.keras'))
    with open(os.path.join(model_path, 'train.json'), 'w') as file:
        json.dump(info, file, indent=2)


def train(dataset_path: InputPath('npz'), model_path: OutputPath('Model'), num_hidden_layer_1: int = 128,
          num_hidden_layer_2: int = 256, dropout: float = 1.0, learning_rate: float = 0.01, epoch: int = 2000,
          batch_size: int = 256, seed: int = 0, log_dir: str = ''):
    """Train the MLP for `epoch` steps and save it to the folder model_path (model.keras and train.json).
    `dropout` is the keep probability. With a log_dir, write TensorBoard logs to <log_dir>/<run name>/.
    Returns the trained Keras model too, which a caller in the same process (mnist.run) hands to evaluate and export
    instead of loading model.keras again; a KFP component ignores it."""
    use_one_thread()
    data = read_dataset(dataset_path)
    train_examples = len(data['x_train'])
    if train_examples // batch_size == 0:
        raise ValueError(f'batch size {batch_size} is larger than the {train_examples} training examples')
    keras.utils.set_random_seed(seed)
    statistics = pixel_statistics(data['x_train'])
    model = build_model(num_hidden_layer_1, num_hidden_layer_2, dropout, seed, statistics)
    optimizer = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=epoch),
                                     momentum=0.9, nesterov=True)
    optimizer.build(model.trainable_variables)
    loss_function = keras.losses.SparseCategoricalCrossentropy()
    # The images stay uint8 in memory (a float copy of the training set would take 188 MB) and each step gathers its
    # own batch.
    train_steps = make_training_loop(model, optimizer, loss_function, tf.constant(data.pop('x_train')),
                                     tf.constant(data['y_train'].astype(np.int32)), batch_size)
    test_metrics = make_test_pass(model, loss_function, tf.constant(data['x_test']),
                                  tf.constant(data['y_test'].astype(np.int32)))
    run_dir, writers = None, {}
    if log_dir:
        run_dir, writers = open_writers(log_dir, (
            f'{datetime.datetime.now():%Y%m%d-%H%M%S}-h{num_hidden_layer_1}-{num_hidden_layer_2}'
            f'-keep{dropout:.3g}-lr{learning_rate:.3g}-steps{epoch}-seed{seed}'))
    train_seconds = run_training(train_steps, test_metrics, writers, epoch,
                                 batches_in_order(train_examples, batch_size, seed))
    hyperparameters = {'num_hidden_layer_1': num_hidden_layer_1, 'num_hidden_layer_2': num_hidden_layer_2,
                       'dropout': dropout, 'learning_rate': learning_rate, 'epoch': epoch,
                       'batch_size': batch_size, 'seed': seed}
    if writers:
        log_figures(writers, run_dir, model, (data['x_test'], data['y_test']), hyperparameters)
        close_writers(writers)
    save(model, model_path, {
        'hyperparameters': hyperparameters, 'steps': int(optimizer.iterations.numpy()),
        'train_seconds': train_seconds, 'tensorflow_version': tf.__version__, 'keras_version': keras.__version__,
        'data_source': data['source'], 'data_sha256': data['source_sha256'], 'train_examples': train_examples,
        'standardisation': {'mean': statistics[0], 'std': statistics[1]}, 'tensorboard_run_dir': run_dir})
    return model
