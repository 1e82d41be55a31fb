"""Race promotions: how often do concurrent promotions into one serving folder leave a worse model above a better one?

Each round makes a serving folder holding version 1 (recorded accuracy 0.80) and starts --processes processes that
spin until one shared instant and then call promote() with candidates of different recorded accuracies (copies of
one exported SavedModel). A round is bad when the versions' accuracies, in version order, ever decrease. Point
--promote_dir at a folder holding another promote.py (say, an older commit's) to measure it instead.

    python3 bench/promotion_race_bench.py --candidate /tmp/export --rounds 8
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMOTER = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
from promote import promote
candidate, serving, outputs, start = sys.argv[2:]
while time.time() < float(start):
    pass
promote(candidate, serving, outputs + '/metrics.json', outputs + '/ui.json')
'''


def set_accuracy(model_dir, accuracy):
    path = os.path.join(model_dir, 'assets.extra', 'run.json')
    with open(path) as record_file:
        record = json.load(record_file)
    record['accuracy'] = accuracy
    with open(path, 'w') as record_file:
        json.dump(record, record_file)


def run_round(candidate, promote_dir, processes, work_dir, generator):
    """One race; returns the accuracies of the versions left, in version order."""
    serving = os.path.join(work_dir, 'serving')
    shutil.copytree(candidate, os.path.join(serving, '1'))
    set_accuracy(os.path.join(serving, '1'), 0.80)
    accuracies = generator.sample([round(0.81 + index / 100, 2) for index in range(processes)], processes)
    candidates = []
    for index, accuracy in enumerate(accuracies):
        copy = os.path.join(work_dir, f'candidate-{index}')
        shutil.copytree(candidate, copy)
        set_accuracy(copy, accuracy)
        candidates.append(copy)
    start = str(time.time() + 1.0)
    running = [subprocess.Popen([sys.executable, '-c', PROMOTER, promote_dir, copy, serving,
                                 os.path.join(work_dir, f'outputs-{index}'), start],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for index, copy in enumerate(candidates)]
    for process in running:
        process.wait(timeout=120)
    versions = sorted(int(name) for name in os.listdir(serving) if name.isascii() and name.isdigit())
    scores = []
    for version in versions:
        with open(os.path.join(serving, str(version), 'assets.extra', 'run.json')) as record_file:
            scores.append(json.load(record_file)['accuracy'])
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--candidate', required=True, help='an exported SavedModel folder with assets.extra/run.json')
    parser.add_argument('--promote_dir', default=os.path.join(os.path.dirname(HERE), 'mnist_model'),
                        help='folder of the promote.py to measure (default: this repository\'s)')
    parser.add_argument('--rounds', type=int, default=8, help='races to run (default: 8)')
    parser.add_argument('--processes', type=int, default=8, help='promotions per race (default: 8)')
    args = parser.parse_args()
    generator = random.Random(0)
    bad = 0
    for round_number in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix='promotion-race-') as work_dir:
            scores = run_round(args.candidate, args.promote_dir, args.processes, work_dir, generator)
        worse_above_better = scores != sorted(scores)
        bad += worse_above_better
        print(f'round {round_number + 1}: accuracies by version {scores}'
              f'{"  <- a worse model above a better one" if worse_above_better else ""}', flush=True)
    print(f'\n{bad} of {args.rounds} races left a worse model above a better one '
          f'({args.processes} concurrent promotions each)')


if __name__ == '__main__':
    main()
