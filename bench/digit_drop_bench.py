"""Measure how much one digit's accuracy falls when a model that is better overall replaces another, among the demo's
own models: the evidence behind the gate's default --max_digit_drop.

Trains and exports, with the trainer's step functions and seed 0, the models the demo makes -- the first training
(the defaults), the pipeline's short budget (a quarter of the steps), the tuner's trials (run_demo.py's 6 on the full
data, 2 on the quick slice, the same hyperparameters mnist_hyper_tuning.py proposes with --seed 0) -- and the
defaults with seeds 1 and 2 (the same run on another day). Each is measured through serving_default on the test split
(evidence.measure), and for every pair in which one model is better overall the largest drop of one digit's accuracy
is printed, largest first, with the demo's own improvement (the first training replaced by the retrain with the best
trial's values) marked. The full data has about 1000 test images per digit, the quick slice (the first 1000) about
100, so one image is 0.001 of a digit there and 0.01 here. Takes about 3 minutes on 2 cores.

Example:
    python3 bench/digit_drop_bench.py --data_set quick
"""
import argparse
import itertools
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'mnist_model'))
sys.path.insert(0, REPO)

from gate_bench import DATA, export_model  # noqa: E402 - the bench folder is the script's own
import evidence  # noqa: E402 - found through the path set just above
import mnist_hyper_tuning  # noqa: E402
import run_demo  # noqa: E402

QUICK_SPACE = ['epoch=100:200:100', 'num_hidden_layer_1=64:128:64', 'num_hidden_layer_2=64:128:64']


def demo_models(data_set):
    """The models of the demo on one data set ('full' or 'quick'), as {name: hyperparameters over the defaults}."""
    quick = data_set == 'quick'
    first_steps = 100 if quick else 2000
    space = (mnist_hyper_tuning.override_space(mnist_hyper_tuning.SEARCH_SPACE, QUICK_SPACE) if quick
             else mnist_hyper_tuning.SEARCH_SPACE)
    trials = mnist_hyper_tuning.propose_trials(space, 'random', 2 if quick else 6, 0)
    return {'train': {'epoch': first_steps}, 'pipeline': {'epoch': run_demo.SHORT_BUDGET_STEPS[data_set]},
            'train-seed1': {'epoch': first_steps, 'seed': 1}, 'train-seed2': {'epoch': first_steps, 'seed': 2},
            **{f'trial-{number:02d}': dict(values) for number, values in enumerate(trials, 1)}}


def quick_slice(work_dir):
    """The quick demo's data: the first 3000 training and 1000 test images of the bundled data."""
    path = os.path.join(work_dir, 'mnist-quick.npz')
    with np.load(DATA, allow_pickle=False) as full:
        np.savez(path, x_train=full['x_train'][:3000], y_train=full['y_train'][:3000],
                 x_test=full['x_test'][:1000], y_test=full['y_test'][:1000])
    return path


def measure_data_set(data_set, work_dir):
    """Train, export and measure the demo's models on one data set; prints the improving pairs and their drops."""
    data = quick_slice(work_dir) if data_set == 'quick' else DATA
    with np.load(data, allow_pickle=False) as arrays:
        images, labels = arrays['x_test'], arrays['y_test']
    measured = {}
    for name, hparams in demo_models(data_set).items():
        folder = export_model(work_dir, f'{data_set}-{name}', hparams, data)
        measured[name] = evidence.measure(folder, images, labels, name=name)
        print(f'  {data_set} {name}: accuracy {measured[name].accuracy:.4f} ({hparams})', flush=True)
    trials = [name for name in measured if name.startswith('trial-')]
    retrain = max(trials, key=lambda name: measured[name].accuracy)
    everything = evidence.Rule(max_digit_drop=1.0, min_test_examples=1)
    pairs = []
    for old, new in itertools.permutations(measured, 2):
        if measured[new].accuracy > measured[old].accuracy:
            _, record = evidence.judge(measured[new], measured[old], everything)
            pairs.append((record['largest_digit_drop']['drop'], record['largest_digit_drop']['digit'], old, new,
                          measured[new].accuracy - measured[old].accuracy))
    print(f'\n{data_set}: {len(pairs)} pairs in which the second model is better overall, largest digit drop first')
    for drop, digit, old, new, gain in sorted(pairs, reverse=True):
        mark = '   <- the demo\'s retrain' if (old, new) == ('train', retrain) else ''
        print(f'  drop {drop:.4f} (digit {digit})  gain {gain:+.4f}  {old} -> {new}{mark}')
    return max(pairs)[0] if pairs else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data_set', choices=('full', 'quick', 'both'), default='both',
                        help='the full bundled data, the quick demo\'s slice, or both (default: %(default)s)')
    args = parser.parse_args()
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    largest = {}
    with tempfile.TemporaryDirectory(prefix='digit-drop-bench-') as work_dir:
        for data_set in (('full', 'quick') if args.data_set == 'both' else (args.data_set,)):
            largest[data_set] = measure_data_set(data_set, work_dir)
    print(f'\nlargest digit drop of a real improvement: {largest}; the default --max_digit_drop is '
          f'{evidence.Rule().max_digit_drop:g} (1-minute load {os.getloadavg()[0]:.2f})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
