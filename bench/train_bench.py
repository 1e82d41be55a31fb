"""Benchmark the trainer: the demo's tuned command on the full bundled data, run several times in fresh processes.

Prints, per run and as medians: test accuracy, training seconds (model.fit), whole-process wall seconds and peak
RSS; the spread of accuracy across runs with the same --seed; and the accuracy of the predict_image signature on
MNIST test digits re-drawn as users send them (dark ink on light paper, RGB/RGBA/JPEG, scaled up with margins).
Targets on a 2-core machine: accuracy >= 0.980, training <= 5 s, peak RSS <= 0.8 GB, spread <= 0.001,
predict_image accuracy >= 0.95.

    python3 bench/train_bench.py --runs 5
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNED_FLAGS = ['--num_hidden_layer_1=192', '--num_hidden_layer_2=64', '--dropout=0.4905680409621578',
               '--learning_rate=0.09105850855225119', '--epoch=2000']


def train_once(export_dir, log_dir, seed):
    """Run mnist.py once; return accuracy, training seconds, wall seconds and peak RSS in MB of that process."""
    command = [sys.executable, os.path.join(REPO, 'mnist_model', 'mnist.py'), *TUNED_FLAGS, f'--seed={seed}',
               '--export_dir', export_dir, '--log_dir', log_dir]
    started = time.perf_counter()
    with tempfile.TemporaryFile('w+') as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        sys.exit(f'train_bench.py: mnist.py failed:\n{text}')
    accuracy = float(re.search(r'^accuracy=([0-9.]+)$', text, re.MULTILINE).group(1))
    train_seconds = float(re.search(r'training took ([0-9.]+) s', text).group(1))
    return {'accuracy': accuracy, 'train_s': train_seconds, 'wall_s': wall, 'peak_rss_mb': usage.ru_maxrss / 1024}


def measure_predict_image(model_dir, count):
    """Accuracy of predict_image on `count` re-drawn MNIST test digits."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, os.path.join(REPO, 'tests'))
    from user_digits import redraw_digits

    with np.load(os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz'), allow_pickle=False) as data:
        images, labels = data['x_test'][:count], data['y_test'][:count]
    drawn, _ = redraw_digits(images, seed=0)
    model = tf.saved_model.load(model_dir)
    digits = np.concatenate([model.signatures['predict_image'](image_bytes=tf.constant(drawn[start:start + 500]))
                             ['digit'].numpy() for start in range(0, count, 500)])
    return float(np.mean(digits == labels))


def positive_int(text):
    """An argparse type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'must be an integer >= 1, got {text!r}')
    return int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=positive_int, default=5, help='number of training runs (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0, help='seed of every run (default: %(default)s)')
    parser.add_argument('--image_count', type=positive_int, default=2000,
                        help='re-drawn test digits for predict_image (default: %(default)s)')
    args = parser.parse_args()

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    results = []
    with tempfile.TemporaryDirectory() as work:
        for run in range(args.runs):
            result = train_once(os.path.join(work, 'models'), os.path.join(work, 'logs'), args.seed)
            results.append(result)
            print(f'run {run + 1}: accuracy {result["accuracy"]:.4f}  training {result["train_s"]:.2f} s  '
                  f'wall {result["wall_s"]:.2f} s  peak RSS {result["peak_rss_mb"]:.0f} MB', flush=True)
        image_accuracy = measure_predict_image(os.path.join(work, 'models', '1'), args.image_count)

    accuracies = [result['accuracy'] for result in results]
    print(f'\nmedians of {args.runs} runs (seed {args.seed}, {os.cpu_count()} cores):')
    for key, unit in (('accuracy', ''), ('train_s', ' s'), ('wall_s', ' s'), ('peak_rss_mb', ' MB')):
        print(f'  {key:<12} {statistics.median(result[key] for result in results):.4f}{unit}')
    print(f'  accuracy spread across runs with the same seed: {max(accuracies) - min(accuracies):.4f}')
    print(f'  predict_image accuracy on {args.image_count} re-drawn test digits: {image_accuracy:.4f}')


if __name__ == '__main__':
    main()
