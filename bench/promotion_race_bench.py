"""Race promotions: how often do concurrent promotions into one serving folder leave a worse model above a better one?

Each round makes a serving folder holding version 1 (the first --candidates folder, the worst model) and starts
--processes processes that spin until one shared instant and then call promote() with the other candidates, in a
shuffled order (copies of them when there are more processes than candidates). The gate measures every model on the
test split of --data, so the candidates must be real models of different quality (export them with mnist.py
--export_dir at different --epoch values). A round is bad when the versions' measured accuracies, in version order,
ever decrease.

    python3 bench/promotion_race_bench.py --candidates /tmp/worse /tmp/good /tmp/better --data mnist_model/data/mnist.npz
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
candidate, dataset, serving, outputs, start = sys.argv[2:]
while time.time() < float(start):
    pass
promote(candidate, dataset, serving, outputs + '/metrics.json', outputs + '/ui.json')
'''


def measured_accuracies(serving):
    """The accuracy each version's promotion measured, in version order (version 1, the baseline, as promoted)."""
    versions = sorted(int(name) for name in os.listdir(serving) if name.isascii() and name.isdigit())
    scores = []
    for version in versions:
        with open(os.path.join(serving, str(version), 'assets.extra', 'run.json')) as record_file:
            scores.append(json.load(record_file)['accuracy'])
    return versions, scores


def start_promoters(candidates, dataset, serving, work_dir, environment=None):
    """One process per candidate, each spinning until the same instant 1.5 s from now, then promoting it."""
    start = str(time.time() + 1.5)
    return [subprocess.Popen([sys.executable, '-c', PROMOTER, os.path.join(os.path.dirname(HERE), 'mnist_model'),
                              candidate, dataset, serving, os.path.join(work_dir, f'outputs-{index}'), start],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(environment(index) if environment else {})})
            for index, candidate in enumerate(candidates)]


def run_round(baseline, candidates, dataset, processes, work_dir, generator):
    """One race; returns the measured accuracies of the versions left, in version order."""
    serving = os.path.join(work_dir, 'serving')
    shutil.copytree(baseline, os.path.join(serving, '1'))
    racers = [candidates[index % len(candidates)] for index in range(processes)]
    generator.shuffle(racers)
    for process in start_promoters(racers, dataset, serving, work_dir):
        process.communicate(timeout=300)
    return measured_accuracies(serving)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--candidates', nargs='+', required=True,
                        help='exported SavedModel folders of different quality; the first is served as version 1')
    parser.add_argument('--data', required=True, help='the npz whose test split the gate measures on')
    parser.add_argument('--rounds', type=int, default=8, help='races to run (default: 8)')
    parser.add_argument('--processes', type=int, default=8, help='promotions per race (default: 8)')
    args = parser.parse_args()
    generator = random.Random(0)
    bad = 0
    for round_number in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix='promotion-race-') as work_dir:
            scores = run_round(args.candidates[0], args.candidates[1:], args.data, args.processes, work_dir,
                               generator)
        worse_above_better = scores != sorted(scores)
        bad += worse_above_better
        print(f'round {round_number + 1}: accuracies by version {scores}'
              f'{"  <- a worse model above a better one" if worse_above_better else ""}', flush=True)
    print(f'\n{bad} of {args.rounds} races left a worse model above a better one '
          f'({args.processes} concurrent promotions each)')


if __name__ == '__main__':
    main()
