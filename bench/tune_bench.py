"""Benchmark of the local tuner: best test accuracy, trials until the goal was first reached, and wall time.

Runs `mnist_hyper_tuning.py --local` on the full bundled data (12 trials, 2 at a time, seed 0 by default) and reads its
results.json. Targets: best accuracy >= 0.982. It takes a while (12 trials of 1000-3000 steps each).

    python3 bench/tune_bench.py [--max_trials 12] [--parallel 2] [--seed 0] [--output DIR]
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
SCRIPT = os.path.join(REPO, 'mnist_hyper_tuning.py')
GOAL = 0.965
TARGET_ACCURACY = 0.982


def run_tuner(max_trials, parallel, seed, output_dir):
    """Runs the local tuner once; returns (wall seconds, the parsed results.json)."""
    command = [sys.executable, SCRIPT, '--local', '--max_trials', str(max_trials), '--parallel', str(parallel),
               '--seed', str(seed), '--goal', str(GOAL), '-o', output_dir]
    started = time.monotonic()
    completed = subprocess.run(command, cwd=REPO)
    wall_seconds = time.monotonic() - started
    if completed.returncode != 0:
        raise SystemExit(f'error: the tuner exited with code {completed.returncode}')
    with open(os.path.join(output_dir, 'results.json')) as results_file:
        return wall_seconds, json.load(results_file)


def summarize(trials, goal):
    """Best accuracy, trials finished until one reached the goal (None = never), failures, median trial time."""
    succeeded = [trial for trial in trials if trial['status'] == 'succeeded']
    # results.json lists the trials in the order they finished.
    reaching = [position for position, trial in enumerate(trials, 1)
                if trial['status'] == 'succeeded' and trial['accuracy'] >= goal]
    return {
        'best_accuracy': max((trial['accuracy'] for trial in succeeded), default=float('nan')),
        'trials_until_goal': min(reaching, default=None),
        'failed_trials': sum(trial['status'] == 'failed' for trial in trials),
        'median_trial_seconds': statistics.median(trial['seconds'] for trial in succeeded) if succeeded else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--max_trials', type=int, default=12, help='trials per run (default: 12)')
    parser.add_argument('--parallel', type=int, default=2, help='trials at a time (default: 2)')
    parser.add_argument('--seed', type=int, default=0, help='proposal and training seed (default: 0)')
    parser.add_argument('--output', default='', help='keep the tuner results here (default: a temporary folder)')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary_dir:
        output_dir = args.output or os.path.join(temporary_dir, 'tuning')
        wall_seconds, results = run_tuner(args.max_trials, args.parallel, args.seed, output_dir)
    summary = summarize(results['trials'], GOAL)
    print(f'\ntrials: {args.max_trials}, parallel: {args.parallel}, seed: {args.seed}, '
          f'cores: {len(os.sched_getaffinity(0))}')
    print(f'best test accuracy: {summary["best_accuracy"]:.4f} (target >= {TARGET_ACCURACY}: '
          f'{"met" if summary["best_accuracy"] >= TARGET_ACCURACY else "NOT met"})')
    print(f'trials until accuracy >= {GOAL}: {summary["trials_until_goal"] or "never"}')
    print(f'failed trials: {summary["failed_trials"]}')
    print(f'median trial time: {summary["median_trial_seconds"]} s')
    print(f'wall time: {wall_seconds:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
