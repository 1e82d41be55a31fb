"""Measure what the promotion gate's evidence adds to a promotion: the data checks of load_data, and the contract
check and measurement of two models (the candidate and the served version) on the 10 000 test images.

Trains and exports two models on the bundled data with the trainer's step functions (the defaults, 2000 steps, and
the pipeline stage's short budget, 500 steps), unless --models names two SavedModel folders. Each run is a fresh
Python process, as a promotion is: it imports TensorFlow (timed on its own: mnist.py has it loaded already, a KFP
promote step does not), then times check_dataset on the whole data, signature_contract of both models with
contract_difference, measure of both (load with tf.saved_model.load and run serving_default) and judge. Prints every
run and the medians, with the 1-minute load average. Target on the 2-core reference machine: the gate (without the
TensorFlow import) <= 3 s.

Example:
    python3 bench/gate_bench.py --runs 5
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'mnist_model'))
DATA = os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')
TARGET_SECONDS = 3.0


def export_model(work_dir, name, hparams, data=DATA):
    """Train on data with hparams (over the trainer's defaults) and export the model to <work_dir>/<name>/export,
    with the trainer's step functions; returns that folder."""
    import evaluate
    import export
    import load_data
    import mnist
    import train

    folder = os.path.join(work_dir, name)
    dataset = os.path.join(work_dir, f'dataset-{os.path.basename(data)}')
    if not os.path.exists(dataset):
        load_data.load_data(data, dataset)
    hparams = {**mnist.HYPERPARAMETER_DEFAULTS, **hparams}
    model = train.train(dataset, os.path.join(folder, 'model'), log_dir='', **hparams)
    evaluate.evaluate(dataset, os.path.join(folder, 'model'), os.path.join(folder, 'metrics.json'),
                      os.path.join(folder, 'kfp-metrics.json'), os.path.join(folder, 'ui.json'), trained_model=model)
    export.export(os.path.join(folder, 'model'), os.path.join(folder, 'metrics.json'), os.path.join(folder, 'export'),
                  trained_model=model)
    return os.path.join(folder, 'export')


def one_run(served_dir, candidate_dir):
    """One promotion's worth of evidence in this process; returns the seconds of each part as a dict."""
    import numpy as np

    started = time.perf_counter()
    import tensorflow  # noqa: F401 - timed on its own: evidence imports it inside its functions
    import evidence
    seconds = {'tensorflow_import': time.perf_counter() - started}
    with np.load(DATA, allow_pickle=False) as data:
        x_train, y_train, x_test, y_test = (data[key] for key in ('x_train', 'y_train', 'x_test', 'y_test'))
    started = time.perf_counter()
    evidence.check_dataset(x_train, y_train, x_test, y_test, DATA)
    seconds['check_dataset'] = time.perf_counter() - started
    started = gate_started = time.perf_counter()
    difference = evidence.contract_difference(evidence.signature_contract(served_dir),
                                              evidence.signature_contract(candidate_dir), 'version 1')
    seconds['contract'] = time.perf_counter() - started
    champion = evidence.measure(served_dir, x_test, y_test, name='version 1')
    candidate = evidence.measure(candidate_dir, x_test, y_test, name='the candidate')
    seconds['measure_served'], seconds['measure_candidate'] = champion.seconds, candidate.seconds
    started = time.perf_counter()
    reason, _ = evidence.judge(candidate, champion, contract_change=difference)
    seconds['judge'] = time.perf_counter() - started
    seconds['gate'] = time.perf_counter() - gate_started
    return {'seconds': seconds, 'reason': reason, 'accuracies': [champion.accuracy, candidate.accuracy]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=5, help='fresh processes to time (default: %(default)s)')
    parser.add_argument('--models', nargs=2, metavar=('SERVED', 'CANDIDATE'),
                        help='two exported SavedModel folders (default: train and export two)')
    parser.add_argument('--one-run', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if args.one_run:
        print(json.dumps(one_run(*args.one_run)))
        return 0
    with tempfile.TemporaryDirectory(prefix='gate-bench-') as work_dir:
        models = args.models or [export_model(work_dir, 'served', {'epoch': 2000}),
                                 export_model(work_dir, 'candidate', {'epoch': 500})]
        runs = []
        for number in range(args.runs):
            output = subprocess.run([sys.executable, os.path.abspath(__file__), '--one-run', *models],
                                    capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
            parts = ', '.join(f'{name} {value:.2f} s' for name, value in runs[-1]['seconds'].items())
            print(f'run {number + 1}: {parts}; load {os.getloadavg()[0]:.2f}', flush=True)
    print(f'\naccuracies {runs[0]["accuracies"][0]:.4f} (served) and {runs[0]["accuracies"][1]:.4f} (candidate); '
          f'decision: {runs[0]["reason"] or "promote"}')
    print(f'medians of {args.runs} runs ({os.cpu_count()} cores, 1-minute load {os.getloadavg()[0]:.2f}):')
    for name in runs[0]['seconds']:
        print(f'  {name:<20} {statistics.median(run["seconds"][name] for run in runs):.2f} s')
    gate = statistics.median(run['seconds']['gate'] for run in runs)
    print(f'  the gate (contract, two measurements, judge) {gate:.2f} s: target <= {TARGET_SECONDS:g} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
