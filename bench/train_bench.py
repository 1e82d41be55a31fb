"""Benchmark the trainer against two references measured in the same run: the floor loop and an eager loop.

Every round runs four fresh processes one after the other, so that the machine's load hits them alike:
  1. mnist.py, the demo's tuned command on the full bundled data: its training time (the figure of its last progress
     line and of run.json's train_seconds), its whole wall time, test accuracy and peak RSS;
  2. the floor loop: the same MLP shape (784-192-64-10) trained for the same 2000 steps of 256 examples as ONE plain
     tf.function over tf.range (gather a batch, forward, GradientTape, momentum update; no Keras, no batch
     normalisation, no dropout, no test passes), timed from its first call to its result, tracing included; with
     TensorFlow's default threads (the target's reference), and again with one thread, as mnist.py trains (the fairer
     floor: the bare loop is faster with one thread too);
  3. the eager reference: the seed demo's recipe, the same MLP as TensorFlow ops trained by an eager GradientTape
     loop, one Python iteration per batch of 256, then tested; the whole process's wall time. (The same loop around
     a Keras model and a Keras optimizer is 2-3 times slower: that would be an easier reference.)
It prints each round, then medians (of the rounds and of the per-round ratios) with the targets fit / floor <= 1.3,
mnist.py wall / eager wall <= 0.5, accuracy >= 0.980; the accuracy spread across runs with one seed; the accuracy
of predict_image on MNIST test digits re-drawn as users send them (target >= 0.975); and the load before and after.

    python3 bench/train_bench.py --runs 5
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')
TUNED_FLAGS = ['--num_hidden_layer_1=192', '--num_hidden_layer_2=64', '--dropout=0.4905680409621578',
               '--learning_rate=0.09105850855225119', '--epoch=2000']
STEPS, BATCH_SIZE, LAYER_SIZES = 2000, 256, (784, 192, 64, 10)
TARGETS = {'fit_over_floor': 1.3, 'wall_over_eager': 0.5, 'accuracy': 0.980, 'predict_image': 0.975}


def run_floor_loop(one_thread=False):
    """The floor: 2000 steps of the bare MLP in one tf.function call. Returns its seconds, tracing included. With
    one_thread, TensorFlow runs its operations in one thread, as mnist.py's train() does."""
    import numpy as np
    import tensorflow as tf

    if one_thread:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)

    with np.load(DATA, allow_pickle=False) as data:
        images = tf.constant(data['x_train'].reshape(-1, 784).astype(np.float32) / 255.0)
        labels = tf.constant(data['y_train'].astype(np.int32))
    tf.random.set_seed(0)
    weights = [tf.Variable(tf.random.normal([inputs, outputs], stddev=(2.0 / inputs) ** 0.5))
               for inputs, outputs in zip(LAYER_SIZES, LAYER_SIZES[1:])]
    biases = [tf.Variable(tf.zeros([outputs])) for outputs in LAYER_SIZES[1:]]
    parameters = weights + biases
    velocities = [tf.Variable(tf.zeros_like(parameter)) for parameter in parameters]

    @tf.function
    def train(steps):
        loss_sum = tf.constant(0.0)
        for step in tf.range(steps):
            batch = tf.random.stateless_uniform([BATCH_SIZE], [0, step], 0, len(images), dtype=tf.int32)
            pixels, digits = tf.gather(images, batch), tf.gather(labels, batch)
            with tf.GradientTape() as tape:
                hidden = tf.nn.relu(pixels @ weights[0] + biases[0])
                hidden = tf.nn.relu(hidden @ weights[1] + biases[1])
                logits = hidden @ weights[2] + biases[2]
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(digits, logits))
            for parameter, velocity, gradient in zip(parameters, velocities, tape.gradient(loss, parameters)):
                velocity.assign(0.9 * velocity + gradient)
                parameter.assign_sub(0.05 * velocity)
            loss_sum += loss
        return loss_sum / tf.cast(steps, tf.float32)

    started = time.perf_counter()
    mean_loss = float(train(tf.constant(STEPS)))
    return {'seconds': time.perf_counter() - started, 'mean_loss': mean_loss}


def run_eager_reference():
    """The seed's recipe: the MLP as TensorFlow ops run eagerly, one Python iteration (and one GradientTape) per
    batch of 256, then tested. Returns its test accuracy."""
    import numpy as np
    import tensorflow as tf

    with np.load(DATA, allow_pickle=False) as data:
        x_train, y_train = data['x_train'].reshape(-1, 784), data['y_train'].astype(np.int32)
        x_test, y_test = data['x_test'].reshape(-1, 784), data['y_test']
    tf.random.set_seed(0)
    weights = [tf.Variable(tf.random.truncated_normal([inputs, outputs], stddev=0.1))
               for inputs, outputs in zip(LAYER_SIZES, LAYER_SIZES[1:])]
    biases = [tf.Variable(tf.fill([outputs], 0.1)) for outputs in LAYER_SIZES[1:]]
    parameters = weights + biases
    velocities = [tf.Variable(tf.zeros_like(parameter)) for parameter in parameters]

    def logits_of(pixels, keep):
        hidden = tf.nn.relu(pixels / 255.0 @ weights[0] + biases[0])
        hidden = tf.nn.relu(hidden @ weights[1] + biases[1])
        hidden = tf.nn.dropout(hidden, rate=1.0 - keep) if keep < 1.0 else hidden
        return hidden @ weights[2] + biases[2]

    order = np.random.default_rng(0).permutation(len(x_train))
    for step in range(STEPS):
        batch = order[(step * BATCH_SIZE) % (len(order) - BATCH_SIZE):][:BATCH_SIZE]
        pixels, digits = tf.constant(x_train[batch], tf.float32), tf.constant(y_train[batch])
        with tf.GradientTape() as tape:
            logits = logits_of(pixels, keep=0.5)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(digits, logits))
        for parameter, velocity, gradient in zip(parameters, velocities, tape.gradient(loss, parameters)):
            velocity.assign(0.9 * velocity + gradient)
            parameter.assign_sub(0.05 * velocity)
    predictions = np.argmax(logits_of(tf.constant(x_test, tf.float32), keep=1.0), axis=1)
    return {'accuracy': float(np.mean(predictions == y_test))}


def run_process(command):
    """Run a command; return its stdout, wall seconds and peak RSS in MB. Exits on failure."""
    started = time.perf_counter()
    with tempfile.TemporaryFile('w+') as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        output.seek(0)
        text = output.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f'train_bench.py: {" ".join(command[:3])} failed:\n{text}')
    return text, wall, usage.ru_maxrss / 1024


def train_once(export_dir, log_dir, seed):
    """Run mnist.py once into a fresh serving folder inside export_dir (the first version, as on a fresh clone: the
    same model again would be declined as identical); return accuracy, training seconds (run.json), wall seconds and
    peak RSS in MB."""
    os.makedirs(export_dir, exist_ok=True)
    export_dir = tempfile.mkdtemp(prefix='round-', dir=export_dir)
    command = [sys.executable, os.path.join(REPO, 'mnist_model', 'mnist.py'), *TUNED_FLAGS, f'--seed={seed}',
               '--export_dir', export_dir, '--log_dir', log_dir]
    text, wall, peak_rss = run_process(command)
    version = re.search(r'^Promoted: version (\d+)', text, re.MULTILINE).group(1)
    with open(os.path.join(export_dir, version, 'assets.extra', 'run.json')) as file:
        record = json.load(file)
    # A trainer from before run.json recorded train_seconds printed the figure only.
    fit_seconds = record.get('train_seconds') or float(re.search(r'training took ([0-9.]+) s', text).group(1))
    return {'accuracy': record['accuracy'], 'fit_s': fit_seconds, 'wall_s': wall, 'peak_rss_mb': peak_rss,
            'model_dir': os.path.join(export_dir, version)}


def run_reference(name):
    """Run one reference loop of this script in a fresh process; return its result and its wall seconds."""
    text, wall, _ = run_process([sys.executable, os.path.abspath(__file__), '--reference', name])
    return {**json.loads(text.strip().splitlines()[-1]), 'wall_s': wall}


def measure_predict_image(model_dir, count):
    """Accuracy of predict_image on `count` re-drawn MNIST test digits."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, os.path.join(REPO, 'tests'))
    from user_digits import redraw_digits

    with np.load(DATA, allow_pickle=False) as data:
        images, labels = data['x_test'][:count], data['y_test'][:count]
    drawn, _ = redraw_digits(images, seed=0)
    model = tf.saved_model.load(model_dir)
    digits = np.concatenate([model.signatures['predict_image'](image_bytes=tf.constant(drawn[start:start + 500]))
                             ['digit'].numpy() for start in range(0, count, 500)])
    return float(np.mean(digits == labels))


def load_average():
    """The 1-minute load average, as uptime prints it."""
    return os.getloadavg()[0]


def positive_int(text):
    """An argparse type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'must be an integer >= 1, got {text!r}')
    return int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=positive_int, default=5,
                        help='rounds of mnist.py and the references (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0, help='seed of every mnist.py run (default: %(default)s)')
    parser.add_argument('--image_count', type=positive_int, default=2000,
                        help='re-drawn test digits for predict_image (default: %(default)s)')
    parser.add_argument('--reference', choices=('floor', 'floor-one-thread', 'eager'), help=argparse.SUPPRESS)
    args = parser.parse_args()

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if args.reference:
        result = run_eager_reference() if args.reference == 'eager' \
            else run_floor_loop(one_thread=args.reference == 'floor-one-thread')
        print(json.dumps(result))
        return

    load_before = load_average()
    rounds = []
    with tempfile.TemporaryDirectory() as work:
        for number in range(args.runs):
            trained = train_once(os.path.join(work, 'models'), os.path.join(work, 'logs'), args.seed)
            floor, floor_one_thread = run_reference('floor'), run_reference('floor-one-thread')
            eager = run_reference('eager')
            rounds.append({**trained, 'floor_s': floor['seconds'], 'floor_one_thread_s': floor_one_thread['seconds'],
                           'fit_over_floor_one_thread': trained['fit_s'] / floor_one_thread['seconds'],
                           'eager_wall_s': eager['wall_s'], 'eager_accuracy': eager['accuracy'],
                           'fit_over_floor': trained['fit_s'] / floor['seconds'],
                           'wall_over_eager': trained['wall_s'] / eager['wall_s']})
            last = rounds[-1]
            print(f'round {number + 1}: mnist.py accuracy {last["accuracy"]:.4f}  fit {last["fit_s"]:.2f} s  '
                  f'wall {last["wall_s"]:.2f} s  peak RSS {last["peak_rss_mb"]:.0f} MB | floor {last["floor_s"]:.2f} s'
                  f' (one thread {last["floor_one_thread_s"]:.2f} s) | eager wall {last["eager_wall_s"]:.2f} s '
                  f'(accuracy {last["eager_accuracy"]:.4f}) | fit/floor {last["fit_over_floor"]:.2f}  '
                  f'wall/eager {last["wall_over_eager"]:.2f}  load {load_average():.2f}', flush=True)
        image_accuracy = measure_predict_image(rounds[-1]['model_dir'], args.image_count)

    def median(key):
        return statistics.median(result[key] for result in rounds)

    accuracies = [result['accuracy'] for result in rounds]
    print(f'\nmedians of {args.runs} rounds (seed {args.seed}, {os.cpu_count()} cores, 1-minute load '
          f'{load_before:.2f} before, {load_average():.2f} after):')
    print(f'  mnist.py training (fit)   {median("fit_s"):.2f} s')
    print(f'  floor loop                {median("floor_s"):.2f} s')
    print(f'  fit / floor               {median("fit_over_floor"):.2f}  (target <= {TARGETS["fit_over_floor"]})')
    print(f'  floor loop, one thread    {median("floor_one_thread_s"):.2f} s  (fit / it '
          f'{median("fit_over_floor_one_thread"):.2f}: the floor with the thread setting of mnist.py)')
    print(f'  eager reference, wall     {median("eager_wall_s"):.2f} s  (its accuracy {median("eager_accuracy"):.4f})')
    print(f'  mnist.py wall             {median("wall_s"):.2f} s')
    print(f'  mnist.py wall / eager     {median("wall_over_eager"):.2f}  (target <= {TARGETS["wall_over_eager"]})')
    print(f'  test accuracy             {median("accuracy"):.4f}  (target >= {TARGETS["accuracy"]}; spread across '
          f'runs with the same seed {max(accuracies) - min(accuracies):.4f})')
    print(f'  peak RSS of mnist.py      {median("peak_rss_mb"):.0f} MB')
    print(f'  predict_image accuracy on {args.image_count} re-drawn test digits: {image_accuracy:.4f} '
          f'(target >= {TARGETS["predict_image"]})')


if __name__ == '__main__':
    main()
