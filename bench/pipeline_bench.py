"""Benchmark the KFP pipeline's local run: full data, the demo's tuned hyperparameters, wall time per run.

Runs `mnist_model/mnist_pipeline.py --run-local` (kfp LocalClient, every step in its own process, as on a cluster),
or with --pipeline v2 `mnist_model/mnist_pipeline_v2.py --run-local` (kfp.local) in the kfp 2 environment, several
times and prints the median wall time of the whole command, the training seconds the train step reported, test
accuracy and the peak RSS of the largest process. Target on the 2-core reference machine: wall <= 60 s.

    python3 bench/pipeline_bench.py --repeats 3
    python3 bench/pipeline_bench.py --repeats 3 --pipeline v2    # the kfp 2 environment: see --help
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {'v1': os.path.join(REPO, 'mnist_model', 'mnist_pipeline.py'),
           'v2': os.path.join(REPO, 'mnist_model', 'mnist_pipeline_v2.py')}
# The demo's tuned command line (the values Katib found in the original demo).
TUNED = ['--num_hidden_layer_1=192', '--num_hidden_layer_2=64', '--dropout=0.4905680409621578',
         '--learning_rate=0.09105850855225119', '--epoch=2000']
TARGET_WALL_SECONDS = 60.0


def run_once(pipeline_root: str, python: str, script: str) -> dict:
    """One local pipeline run; returns wall seconds, test accuracy and the train step's training seconds."""
    started = time.monotonic()
    result = subprocess.run([python, script, '--run-local', '--pipeline_root', pipeline_root] + TUNED,
                            capture_output=True, text=True)
    wall_seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f'pipeline run failed: {result.stderr.strip().splitlines()[-1:]}')
    accuracy = float(re.search(r'^accuracy=([0-9.]+)$', result.stdout, re.MULTILINE).group(1))
    model_folder = re.search(r'^  model\s+(\S+)$', result.stdout, re.MULTILINE).group(1)
    with open(os.path.join(model_folder, 'train.json'), encoding='utf-8') as train_file:
        train_seconds = json.load(train_file)['train_seconds']
    return {'wall_seconds': wall_seconds, 'accuracy': accuracy, 'train_seconds': train_seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Time the full-data local KFP pipeline run.')
    parser.add_argument('--repeats', type=int, default=3, choices=range(1, 21), metavar='N',
                        help='number of runs, 1-20 (default: %(default)s)')
    parser.add_argument('--pipeline', choices=('v1', 'v2'), default='v1',
                        help='which pipeline (default: %(default)s); v2 runs in the kfp 2 environment')
    args = parser.parse_args(argv)
    python = sys.executable
    if args.pipeline == 'v2':
        sys.path.insert(0, os.path.join(REPO, 'mnist_model'))
        from pipeline_cli import find_kfp2_python
        python = find_kfp2_python()
        if python is None:
            parser.error('--pipeline v2 needs the kfp 2 environment: set MNIST_KFP2_PYTHON to its python')
    runs = []
    with tempfile.TemporaryDirectory(prefix='pipeline-bench-') as pipeline_root:
        for number in range(args.repeats):
            try:
                runs.append(run_once(os.path.join(pipeline_root, str(number)), python, SCRIPTS[args.pipeline]))
            except RuntimeError as error:
                print(f'error: {error}', file=sys.stderr)
                return 1
            print(f'run {number + 1}: wall {runs[-1]["wall_seconds"]:.1f} s, train {runs[-1]["train_seconds"]:.1f} s, '
                  f'accuracy {runs[-1]["accuracy"]:.4f}', flush=True)
    # ru_maxrss of the children covers the step processes too (their RSS is folded in when they are waited for).
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    wall = statistics.median(run['wall_seconds'] for run in runs)
    print(f'median of {len(runs)}: wall {wall:.1f} s (target <= {TARGET_WALL_SECONDS:.0f} s), '
          f'train {statistics.median(run["train_seconds"] for run in runs):.1f} s, '
          f'accuracy {statistics.median(run["accuracy"] for run in runs):.4f}, '
          f'peak RSS of the largest process {peak_rss_gb:.2f} GB')
    return 0 if wall <= TARGET_WALL_SECONDS else 1


if __name__ == '__main__':
    sys.exit(main())
