"""Benchmark the one-command demo: `python3 run_demo.py` end to end, wall time and the served model's accuracy.

Runs README's command several times (each into a fresh report folder) and prints the wall time of each run, the
seconds of each stage, and the test accuracy of the model served at the end, then the medians. Targets on the 2-core
reference machine: the full run <= 100 s with the served model >= 0.980; --quick <= 60 s.

    python3 bench/demo_bench.py --repeats 3
    python3 bench/demo_bench.py --repeats 3 --quick
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
TARGETS = {'full': {'seconds': 100.0, 'accuracy': 0.980}, 'quick': {'seconds': 60.0, 'accuracy': 0.0}}


def run_once(report_dir, quick):
    """One demo run; returns its wall seconds and summary.json."""
    started = time.monotonic()
    command = [sys.executable, 'run_demo.py', '--output', report_dir] + (['--quick'] if quick else [])
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall_seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f'run_demo.py failed: {result.stdout.strip().splitlines()[-2:]}')
    with open(os.path.join(report_dir, 'summary.json'), encoding='utf-8') as summary_file:
        return wall_seconds, json.load(summary_file)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Time the whole demo, run_demo.py, end to end.')
    parser.add_argument('--repeats', type=int, default=3, choices=range(1, 11), metavar='N',
                        help='number of runs, 1-10 (default: %(default)s)')
    parser.add_argument('--quick', action='store_true', help='time run_demo.py --quick instead')
    args = parser.parse_args(argv)
    mode = 'quick' if args.quick else 'full'
    walls, accuracies, stage_seconds = [], [], {}
    with tempfile.TemporaryDirectory(prefix='demo-bench-') as work_dir:
        for number in range(args.repeats):
            try:
                wall, summary = run_once(os.path.join(work_dir, str(number)), args.quick)
            except RuntimeError as error:
                print(f'error: {error}', file=sys.stderr)
                return 1
            walls.append(wall)
            accuracies.append(summary['served']['accuracy'])
            for stage in summary['stages']:
                stage_seconds.setdefault(stage['name'], []).append(stage['seconds'])
            stages = ', '.join(f'{stage["name"]} {stage["seconds"]:.0f}' for stage in summary['stages'])
            print(f'run {number + 1}: wall {wall:.0f} s ({stages}); served version {summary["served"]["version"]} '
                  f'accuracy {accuracies[-1]:.4f}', flush=True)
    target = TARGETS[mode]
    wall, accuracy = statistics.median(walls), statistics.median(accuracies)
    stages = ', '.join(f'{name} {statistics.median(seconds):.1f}' for name, seconds in stage_seconds.items())
    print(f'median of {len(walls)} {mode} runs: wall {wall:.0f} s (target <= {target["seconds"]:.0f} s); stages (s): '
          f'{stages}; served accuracy {accuracy:.4f} (target >= {target["accuracy"]:.3f})')
    return 0 if wall <= target['seconds'] and accuracy >= target['accuracy'] else 1


if __name__ == '__main__':
    sys.exit(main())
