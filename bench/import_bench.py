"""Time `import tensorflow` in fresh processes: every trial, pipeline step, trainer run and model server pays it once,
so it is a floor under the demo's and the tests' time. Also times the modules that weigh most in it.

Prints the median wall and CPU time of --runs fresh `python3 -c "import <module>"` processes for each module, alternated so
that other load on the machine falls on all of them alike. The pin of ml_dtypes in requirements-base.txt comes from
here: ml_dtypes 0.7.0 took 0.8 s of every TensorFlow import on the 2-core reference machine, 0.6.0 0.09 s.

Example:
    python3 bench/import_bench.py --runs 5
    PYTHONPATH=/tmp/ml_dtypes-0.7.0 python3 bench/import_bench.py --runs 5   # after pip install --no-deps --target
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

MODULES = ('tensorflow', 'ml_dtypes', 'keras', 'matplotlib.pyplot', 'scipy.special')


def time_import(module):
    """Wall seconds and CPU seconds (user + system, which other load changes less) of a fresh interpreter importing
    module (and exiting)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, '-c', f'import {module}'], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=5, help='fresh processes per module (default: %(default)s)')
    args = parser.parse_args()
    if args.runs < 1:
        parser.error('--runs must be >= 1')
    import ml_dtypes

    seconds = {module: [] for module in MODULES}
    for _ in range(args.runs):
        for module in MODULES:
            seconds[module].append(time_import(module))
    print(f'ml_dtypes {ml_dtypes.__version__}; median of {args.runs} fresh processes, wall and CPU seconds:')
    for module, values in seconds.items():
        walls, cpus = zip(*values)
        print(f'  import {module:18s} {statistics.median(walls):.2f} s wall, {statistics.median(cpus):.2f} s CPU  '
              f'(wall of each run: {", ".join(f"{value:.2f}" for value in walls)})')


if __name__ == '__main__':
    main()
