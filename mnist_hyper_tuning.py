"""Hyperparameter tuning for the MNIST MLP: Katib trial code, the Katib Experiment manifest and a local tuner.

One search space (SEARCH_SPACE below) serves all three modes:

Trial mode (default) is what every Katib trial runs. It trains with the same step functions as mnist_model/mnist.py
(no export unless --export_dir is given) and prints the result on stdout as the two lines Katib's StdOut metrics
collector reads, e.g. `accuracy=0.981200` and `loss=0.063400`, with one anchored whole-line pattern
(METRIC_LINE_FORMAT, also in the Experiment). Everything else goes to stderr, and no other line there can match the
pattern (trial_output.py). A diverged or otherwise non-finite result is a failed trial: one line on stderr, exit code
1, no metric lines.

    python3 mnist_hyper_tuning.py --num_hidden_layer_1=192 --num_hidden_layer_2=64 --dropout=0.5 \
        --learning_rate=0.09 --epoch=2000

Manifest mode writes the kubeflow.org/v1beta1 Experiment (committed as katib-experiment.yaml; regenerate it after
changing the space):

    python3 mnist_hyper_tuning.py --katib-experiment -o katib-experiment.yaml

Local mode tunes on this machine with no cluster: trials run in parallel worker processes (each one runs this script
in trial mode and its output is read with the Experiment's own pattern; a trial without exactly one accuracy in
[0, 1] and one loss failed). It prints a line when a trial starts,
every 10 s the step and test accuracy of each running trial, a line per finished trial, a final leaderboard and the
`python3 mnist.py ...` command that retrains the best trial; it writes results.csv / results.json (rewritten after
every trial, so Ctrl-C keeps what finished) and TensorBoard logs of every trial under <output>/tensorboard:

    python3 mnist_hyper_tuning.py --local --max_trials 12 --parallel 2 --seed 0
"""
import argparse
import csv
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import yaml

import trial_output

# The trainer's modules import each other by name, as the pipeline components that embed them do.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist_model'))
import mnist  # noqa: E402 (after the path it is found on)


class Parameter(NamedTuple):
    name: str
    type: str  # 'int' or 'double', as Katib's parameterType
    min: float
    max: float
    step: float
    description: str


# The search space of the demo, defined once: the Katib manifest, the local tuner and the --space checks all read it.
# dropout is the KEEP probability (1.0 = no dropout); epoch is the number of training steps (mini-batches).
SEARCH_SPACE = (
    Parameter('num_hidden_layer_1', 'int', 64, 256, 64, 'Units of the first hidden ReLU layer'),
    Parameter('num_hidden_layer_2', 'int', 64, 256, 64, 'Units of the second hidden ReLU layer'),
    Parameter('dropout', 'double', 0.25, 1.0, 0.25, 'Dropout keep probability (1.0 = no dropout)'),
    Parameter('learning_rate', 'double', 0.01, 0.1, 0.01, 'Peak learning rate of SGD with cosine decay'),
    Parameter('epoch', 'int', 1000, 3000, 500, 'Training steps (mini-batches)'),
)
OBJECTIVE_METRIC = 'accuracy'  # test accuracy, maximised
ADDITIONAL_METRICS = ('loss',)
DEFAULT_GOAL = 0.965

METRIC_NAMES = (OBJECTIVE_METRIC,) + ADDITIONAL_METRICS
# The one pattern a trial's metrics are read with: Katib's StdOut collector (the Experiment's metricsFormat) and the
# local tuner apply it to every line of the trial's merged stdout and stderr. Katib's default pattern is unanchored
# and would read `accuracy=0.999` inside any path or message the trial prints; this one reads only a line that is
# nothing but `accuracy=0.981200` or `loss=0.063400`, and trial mode keeps every other line from being one.
METRIC_LINE_FORMAT = trial_output.metric_line_format(METRIC_NAMES)
METRIC_LINE_PATTERN = re.compile(METRIC_LINE_FORMAT)

EXPERIMENT_NAME = 'mnist-classification-hyperparam'
EXPERIMENT_DESCRIPTION = ('Hyperparameter tuning of the MNIST MLP classifier (two hidden ReLU layers): maximise test '
                          'accuracy over the hidden layer sizes, dropout keep probability, learning rate and '
                          'training steps.')
KATIB_ALGORITHMS = ('random', 'grid', 'bayesianoptimization', 'tpe')
LOCAL_ALGORITHMS = ('random', 'grid')
# The demo's "Basic" trial thresholds. Local runs default to 2 parallel trials: this laptop-sized machine has 2 cores.
TRIAL_COUNT_DEFAULTS = {'parallel': 3, 'max_trials': 12, 'max_failed_trials': 3}
LOCAL_PARALLEL_DEFAULT = 2
# The demo's notebook image, built by the repository's Dockerfile: the repository is copied to /opt/mlops-demo and
# requirements.txt installed, so trials run this very script on the bundled data with no network access. <registry>
# stands for the registry you push it to (pass --image): Docker Hub's jupyter/ namespace belongs to Project Jupyter.
DEFAULT_IMAGE = '<registry>/jupyter/mnist-tensorflow-cpu:1.0.0'
IMAGE_REPO_DIR = '/opt/mlops-demo'
# The profile namespace of a default Kubeflow install; Katib injects its metrics collector only in namespaces labelled
# katib.kubeflow.org/metrics-collector-injection=enabled (profile namespaces are).
DEFAULT_NAMESPACE = 'kubeflow-user-example-com'
PRIMARY_CONTAINER = 'training-container'
# Katib's defaults for a batch/v1 Job, written out so the manifest states when a trial succeeded or failed.
JOB_SUCCESS_CONDITION = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
JOB_FAILURE_CONDITION = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
MNIST_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(mnist.__file__)), 'mnist.py')
# Columns of results.csv; the rows are in the order the trials finished. Times are UTC, ISO 8601.
RESULT_FIELDS = ('trial', 'status', 'accuracy', 'loss') + tuple(parameter.name for parameter in SEARCH_SPACE) + (
    'started_at', 'finished_at', 'seconds', 'error', 'log_file')
# The local tuner is never silent longer than this while trials run: it prints each running trial's progress.
PROGRESS_SECONDS = 10
# The trainer's progress line, printed every 200 steps, e.g.
# `step    200/2000  train loss 0.3331 accuracy 0.9012  test loss 0.2150 accuracy 0.9371  (3.1 s)`.
TRAINER_PROGRESS_PATTERN = re.compile(
    r'^step +(\d+)/(\d+) +train loss \S+ accuracy \S+ +test loss \S+ accuracy (\S+)', re.MULTILINE)


def grid_values(parameter):
    """Every value of a parameter from min to max in steps of step (floats rounded so 0.3 prints as 0.3)."""
    count = math.floor((parameter.max - parameter.min) / parameter.step + 1e-9) + 1
    if parameter.type == 'int':
        return [int(parameter.min + index * parameter.step) for index in range(count)]
    return [round(parameter.min + index * parameter.step, 10) for index in range(count)]


def count_combinations(space):
    return math.prod(len(grid_values(parameter)) for parameter in space)


# The trainer's own checks of each tuned value (the same argparse types as mnist.py's flags).
TRAINER_VALUE_TYPES = {'num_hidden_layer_1': mnist.positive_int, 'num_hidden_layer_2': mnist.positive_int,
                       'dropout': mnist.keep_probability, 'learning_rate': mnist.positive_float,
                       'epoch': mnist.positive_int}


def override_space(space, overrides):
    """Returns the space with parameters replaced by NAME=MIN:MAX:STEP texts; raises ValueError on a bad text."""
    by_name = {parameter.name: parameter for parameter in space}
    for text in overrides:
        name, _, bounds = text.partition('=')
        if name not in by_name:
            raise ValueError(f'--space {text}: unknown parameter {name!r} (one of {", ".join(by_name)})')
        cast = int if by_name[name].type == 'int' else float
        try:
            low, high, step = (cast(value) for value in bounds.split(':'))
        except ValueError:
            raise ValueError(f'--space {text}: expected {name}=MIN:MAX:STEP with {by_name[name].type} values') from None
        if not (math.isfinite(low) and math.isfinite(high) and low <= high and step > 0):
            raise ValueError(f'--space {text}: need MIN <= MAX and STEP > 0')
        # Every value must be one the trainer accepts, or each trial would fail on its own flags.
        for value in (low, high):
            try:
                TRAINER_VALUE_TYPES[name](str(value))
            except argparse.ArgumentTypeError as error:
                raise ValueError(f'--space {text}: {name} {error}') from None
        by_name[name] = by_name[name]._replace(min=low, max=high, step=step)
    return tuple(by_name[parameter.name] for parameter in space)


def propose_trials(space, algorithm, count, seed):
    """The hyperparameters of up to `count` trials: distinct random grid points (seeded) or the grid in order."""
    grids = [grid_values(parameter) for parameter in space]
    names = [parameter.name for parameter in space]
    if algorithm == 'grid':
        points = itertools.islice(itertools.product(*grids), count)
        return [dict(zip(names, point)) for point in points]
    # Random search draws each parameter uniformly from its steps, as Katib's random suggestion does when a step is
    # set; repeats are skipped because a second run of the same point teaches nothing.
    generator = random.Random(seed)
    chosen = []
    seen = set()
    while len(chosen) < min(count, count_combinations(space)):
        point = tuple(generator.choice(grid) for grid in grids)
        if point not in seen:
            seen.add(point)
            chosen.append(dict(zip(names, point)))
    return chosen


def format_value(value):
    """The text of a parameter value as flags and the manifest carry it: 192, 0.25, 1.0."""
    return str(value) if isinstance(value, int) else repr(float(value))


def hyperparameter_flags(hparams):
    return [f'--{name}={format_value(value)}' for name, value in hparams.items()]


def build_trial_template(space, image):
    """The Katib trialTemplate: a batch/v1 Job running this script in trial mode with ${trialParameters.NAME}."""
    flags = [f'--{parameter.name}=${{trialParameters.{parameter.name}}}' for parameter in space]
    command = ['python3', f'{IMAGE_REPO_DIR}/mnist_hyper_tuning.py'] + flags + [
        f'--data={IMAGE_REPO_DIR}/mnist_model/data/mnist.npz']
    container = {
        'name': PRIMARY_CONTAINER,
        'image': image,
        'command': command,
        'resources': {'requests': {'cpu': '1', 'memory': '1Gi'}, 'limits': {'memory': '2Gi'}},
    }
    job = {
        'apiVersion': 'batch/v1',
        'kind': 'Job',
        'spec': {
            # A failed trial (for example a diverged one) fails once instead of being retried six times.
            'backoffLimit': 0,
            'template': {
                # Without the Istio sidecar the pod completes when training ends, so the Job can finish.
                'metadata': {'annotations': {'sidecar.istio.io/inject': 'false'}},
                'spec': {'containers': [container], 'restartPolicy': 'Never'},
            },
        },
    }
    return {
        'primaryContainerName': PRIMARY_CONTAINER,
        'successCondition': JOB_SUCCESS_CONDITION,
        'failureCondition': JOB_FAILURE_CONDITION,
        'trialParameters': [{'name': parameter.name, 'description': parameter.description,
                             'reference': parameter.name} for parameter in space],
        'trialSpec': job,
    }


def build_experiment(space, algorithm, trial_counts, goal, trial_template, namespace):
    """The kubeflow.org/v1beta1 Experiment as a plain dict (key order is the order written to YAML)."""
    metadata = {'name': EXPERIMENT_NAME}
    if namespace:
        metadata['namespace'] = namespace
    metadata['annotations'] = {'description': EXPERIMENT_DESCRIPTION}
    parameters = [{'name': parameter.name, 'parameterType': parameter.type,
                   'feasibleSpace': {'min': format_value(parameter.min), 'max': format_value(parameter.max),
                                     'step': format_value(parameter.step)}} for parameter in space]
    return {
        'apiVersion': 'kubeflow.org/v1beta1',
        'kind': 'Experiment',
        'metadata': metadata,
        'spec': {
            'objective': {'type': 'maximize', 'goal': goal, 'objectiveMetricName': OBJECTIVE_METRIC,
                          'additionalMetricNames': list(ADDITIONAL_METRICS)},
            'algorithm': {'algorithmName': algorithm},
            'parallelTrialCount': trial_counts['parallel'],
            'maxTrialCount': trial_counts['max_trials'],
            'maxFailedTrialCount': trial_counts['max_failed_trials'],
            'metricsCollectorSpec': {'collector': {'kind': 'StdOut'},
                                     'source': {'filter': {'metricsFormat': [METRIC_LINE_FORMAT]}}},
            'parameters': parameters,
            'trialTemplate': trial_template,
        },
    }


def experiment_yaml(experiment, arguments, output):
    """The manifest text, headed by the command line that wrote it (its arguments) and how to apply it: kubectl
    apply -f the output file, or the command piped into kubectl when it wrote to stdout (output empty)."""
    command = shlex.join(['python3', 'mnist_hyper_tuning.py'] + list(arguments))
    apply = f'kubectl apply -f {shlex.quote(output)}' if output else f'{command} | kubectl apply -f -'
    header = (f'# Katib Experiment for the MNIST MLP. Generated by `{command}`;\n'
              f'# edit the search space there, not here. Apply: {apply}\n')
    return header + yaml.safe_dump(experiment, sort_keys=False, default_flow_style=False, width=120)


def parse_katib_metrics(text):
    """Every value Katib's StdOut collector reads in a trial's merged output with the Experiment's metricsFormat:
    {name: [values]}."""
    return trial_output.read_metrics(text, METRIC_LINE_PATTERN, METRIC_NAMES)


def run_trial(data, hparams, log_dir, export_dir, model_version, rule):
    """Trial mode: train and evaluate with mnist.run (exporting under the promotion rule) and print the two metric
    lines; returns the exit code. The metric lines are all that reaches stdout: training progress, warnings and
    promotion lines go to stderr, where no line can match the metric pattern (trial_output.other_output_masked)."""
    started = time.monotonic()
    with trial_output.other_output_masked(METRIC_LINE_PATTERN):
        metrics = measure_trial(data, hparams, log_dir, export_dir, model_version, rule)
        if metrics:
            print(f'Trial finished in {time.monotonic() - started:.1f} s', file=sys.stderr, flush=True)
            mnist.warn_if_near_chance(metrics[0], hparams['learning_rate'], hparams['epoch'], prefix='')
    if not metrics:
        return 1
    print(mnist.format_metrics(*metrics), flush=True)
    return 0


def measure_trial(data, hparams, log_dir, export_dir, model_version, rule):
    """(test accuracy, loss) of one trial, or None after one error line on stderr (failed, or not finite numbers)."""
    try:
        result = mnist.run(data, hparams, log_dir=log_dir, export_dir=export_dir, model_version=model_version,
                           rule=rule)
    except (ValueError, OSError) as error:
        # The message may quote a path with line breaks in it: escaped, it stays one line.
        print(f'error: trial failed: {trial_output.single_line(error)}', file=sys.stderr, flush=True)
        return None
    if not (math.isfinite(result['accuracy']) and math.isfinite(result['loss'])):
        print('error: trial failed: the test accuracy or loss is not a finite number', file=sys.stderr, flush=True)
        return None
    return result['accuracy'], result['loss']


def worker_environment(parallel):
    """Environment for a trial process: a fair share of the cores for NumPy's threads, so parallel trials do not
    oversubscribe them. (TensorFlow trains in one thread anyway: mnist.train.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(max(1, cores // parallel)))


def start_trial(trial_name, hparams, common_flags, output_dir, environment):
    """Starts this script in trial mode with its output in <output>/trials/<trial>.log; returns (process, log)."""
    log_path = os.path.join(output_dir, 'trials', f'{trial_name}.log')
    log_dir = os.path.join(output_dir, 'tensorboard', trial_name)
    argv = [sys.executable, os.path.abspath(__file__)] + hyperparameter_flags(hparams) + common_flags + [
        f'--log_dir={log_dir}']
    with open(log_path, 'w') as log_file:
        # Own session: a Ctrl-C reaches only the tuner, which then stops the trials itself and keeps the results.
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
    return process, log_path


def collect_trial(record, return_code, log_path):
    """Fills a trial record from its exit code and its log (stdout and stderr merged, read as Katib reads them): it
    succeeded only with exit code 0 and exactly one accuracy in [0, 1] and one loss."""
    # newline='' keeps '\r' as written: Katib splits lines at '\n' only, and so must this reader.
    with open(log_path, encoding='utf-8', errors='replace', newline='') as log_file:
        text = log_file.read()
    metrics = parse_katib_metrics(text)
    problem = metrics_problem(metrics)
    if return_code == 0 and not problem:
        record.update(status='succeeded', accuracy=metrics[OBJECTIVE_METRIC][0], loss=metrics['loss'][0])
        return record
    lines = [line for line in text.splitlines() if line.strip()]
    reason = problem if return_code == 0 else lines[-1] if lines else 'no output'
    record.update(status='failed', error=f'exit code {return_code}: {reason}')
    return record


def metrics_problem(metrics):
    """Why a trial's metric values cannot be its result ('' = they can): each metric must appear exactly once, and
    the accuracy must be a test accuracy in [0, 1]."""
    for name in METRIC_NAMES:
        if len(metrics[name]) != 1:
            return f'{len(metrics[name])} {name}= lines in the output, expected 1'
    accuracy = metrics[OBJECTIVE_METRIC][0]
    if not 0.0 <= accuracy <= 1.0:
        return f'{OBJECTIVE_METRIC}={accuracy} is not a test accuracy in [0, 1]'
    return ''


def write_results(output_dir, records, summary):
    """Rewrites results.json and results.csv atomically, so an interrupted run never leaves half a file."""
    documents = {'results.json': json.dumps(dict(summary, trials=records), indent=2) + '\n'}
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=RESULT_FIELDS, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows(records)
    documents['results.csv'] = table.getvalue()
    for name, text in documents.items():
        temporary_path = os.path.join(output_dir, f'.{name}.tmp')
        with open(temporary_path, 'w') as result_file:
            result_file.write(text)
        os.replace(temporary_path, os.path.join(output_dir, name))


def tune_locally(trials, common_flags, output_dir, parallel, stop_rule):
    """Runs the trials, `parallel` at a time; returns (records in finishing order, why it stopped or '').

    stop_rule: {'goal': float, 'stop_at_goal': bool, 'max_failed_trials': int}. Results are written after every trial.
    """
    os.makedirs(os.path.join(output_dir, 'trials'), exist_ok=True)
    environment = worker_environment(parallel)
    summary = {'objective': {'metric': OBJECTIVE_METRIC, 'type': 'maximize', 'goal': stop_rule['goal']},
               'proposed': len(trials), 'trial_flags': common_flags, 'stopped': ''}
    pending = [(f'trial-{number:02d}', hparams) for number, hparams in enumerate(trials, 1)]
    running = {}
    records = []
    stop_reason = ''
    last_output = time.monotonic()

    def report(line):
        nonlocal last_output
        print(line, flush=True)
        last_output = time.monotonic()

    # The trials run in their own sessions, so a `kill` of the tuner must stop them as Ctrl-C does.
    previous_handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        while pending or running:
            while pending and len(running) < parallel and not stop_reason:
                trial_name, hparams = pending.pop(0)
                process, log_path = start_trial(trial_name, hparams, common_flags, output_dir, environment)
                record = {'trial': trial_name, 'status': 'running', 'accuracy': None, 'loss': None, **hparams,
                          'started_at': utc_time(), 'finished_at': None, 'seconds': None, 'error': '',
                          'log_file': os.path.relpath(log_path, output_dir)}
                running[trial_name] = (process, log_path, record, time.monotonic())
                report(f'{trial_name} started ({len(trials) - len(pending)} of {len(trials)}) | {format_values(record)}')
            if stop_reason and not running:
                break
            time.sleep(0.2)
            for trial_name, (process, log_path, record, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[trial_name]
                collect_trial(record, process.returncode, log_path)
                record.update(finished_at=utc_time(), seconds=round(time.monotonic() - started, 1))
                records.append(record)
                report(finished_line(record, len(records), len(trials)))
                stop_reason = stop_reason or check_stop(records, stop_rule)
                write_results(output_dir, records, dict(summary, stopped=stop_reason))
            if stop_reason and running:
                stop_trials(running, records)
                write_results(output_dir, records, dict(summary, stopped=stop_reason))
            if running and time.monotonic() - last_output >= PROGRESS_SECONDS:
                report(running_line(running))
    except KeyboardInterrupt:
        stop_reason = 'interrupted'
        # A second Ctrl-C while the trials are being stopped must not leave any of them running.
        for number in previous_handlers:
            signal.signal(number, signal.SIG_IGN)
        stop_trials(running, records)
        write_results(output_dir, records, dict(summary, stopped=stop_reason))
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
    return records, stop_reason


def raise_keyboard_interrupt(signal_number, frame):
    raise KeyboardInterrupt


def check_stop(records, stop_rule):
    """Why the tuner must start no more trials ('' = go on), as Katib ends an Experiment."""
    if stop_rule['stop_at_goal'] and any(record['status'] == 'succeeded' and record['accuracy'] >= stop_rule['goal']
                                         for record in records):
        return f'goal reached (accuracy >= {stop_rule["goal"]})'
    failed = sum(record['status'] == 'failed' for record in records)
    if failed >= stop_rule['max_failed_trials']:
        return f'{failed} trials failed (--max_failed_trials {stop_rule["max_failed_trials"]})'
    return ''


def stop_trials(running, records):
    """Ends the running trial processes and records them as stopped (they have no result)."""
    for process, _, _, _ in running.values():
        process.terminate()
    for process, _, record, started in running.values():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        record.update(status='stopped', finished_at=utc_time(), seconds=round(time.monotonic() - started, 1),
                      error='stopped by the tuner')
        records.append(record)
    running.clear()


def utc_time():
    """The time now as the results files write it: UTC, ISO 8601, whole seconds."""
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())


def format_values(record):
    return ' '.join(f'{parameter.name} {format_value(record[parameter.name])}' for parameter in SEARCH_SPACE)


def finished_line(record, finished, total):
    if record['status'] == 'succeeded':
        outcome = f'accuracy {record["accuracy"]:.4f} loss {record["loss"]:.4f}'
    else:
        outcome = f'FAILED ({record["error"]})'
    return f'[{finished}/{total}] {record["trial"]} {outcome} in {record["seconds"]:.0f} s | {format_values(record)}'


def running_line(running):
    """The running trials, each with its latest step and test accuracy as its own log shows them."""
    states = []
    for trial_name, (_, log_path, _, started) in running.items():
        states.append(f'{trial_name} {trial_progress(log_path)} after {time.monotonic() - started:.0f} s')
    return 'running: ' + ' | '.join(states)


def trial_progress(log_path):
    """'step 400/2000 test accuracy 0.9512' from the last progress line of a trial's log; 'starting' before it."""
    try:
        with open(log_path, 'rb') as log_file:
            # The progress lines come every 200 steps; the end of the log holds the latest one.
            log_file.seek(max(0, os.path.getsize(log_path) - 4096))
            tail = log_file.read().decode('utf-8', errors='replace')
    except OSError:
        return 'starting'
    found = TRAINER_PROGRESS_PATTERN.findall(tail)
    if not found:
        return 'starting'
    step, steps, accuracy = found[-1]
    return f'step {step}/{steps} test accuracy {accuracy}'


def leaderboard(records):
    """The trials as a text table, best accuracy first, failed and stopped trials last."""
    ranked = sorted(records, key=lambda record: (record['status'] != 'succeeded', -(record['accuracy'] or 0.0)))
    names = [parameter.name for parameter in SEARCH_SPACE]
    header = ['rank', 'trial', 'accuracy', 'loss'] + names + ['seconds', 'status']
    rows = []
    for rank, record in enumerate(ranked, 1):
        succeeded = record['status'] == 'succeeded'
        rows.append([str(rank), record['trial'], f'{record["accuracy"]:.4f}' if succeeded else '-',
                     f'{record["loss"]:.4f}' if succeeded else '-'] + [format_value(record[name]) for name in names] + [
                        f'{record["seconds"]:.0f}', record['status']])
    widths = [max(len(row[column]) for row in [header] + rows) for column in range(len(header))]
    return '\n'.join('  '.join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header] + rows)


def retrain_command(hparams, extra_flags):
    """The exact mnist.py command line that trains the given trial again (the demo's retrain step)."""
    # Relative to the current folder when mnist.py is below it (the demo's view), else absolute.
    script = os.path.relpath(MNIST_SCRIPT)
    if script.startswith(os.pardir):
        script = MNIST_SCRIPT
    return shlex.join(['python3', script] + hyperparameter_flags(hparams) + extra_flags)


def check_data(data):
    """Validates --data once before any trial starts, with the trainer's own loader; raises ValueError/OSError."""
    from load_data import load_data

    with tempfile.TemporaryDirectory() as work_dir:
        load_data(data, os.path.join(work_dir, 'dataset.npz'))


# Which flags each mode reads; a flag given in a mode that ignores it is an error, so every flag does what it says.
TUNED_NAMES = tuple(parameter.name for parameter in SEARCH_SPACE)
SEARCH_FLAGS = ('output', 'algorithm', 'max_trials', 'parallel', 'max_failed_trials', 'goal', 'space')
MODE_FLAGS = {
    'trial': TUNED_NAMES + ('batch_size', 'seed', 'data', 'log_dir', 'export_dir', 'model_version') +
    tuple(mnist.PROMOTION_DEFAULTS),
    'local': SEARCH_FLAGS + ('stop_at_goal', 'batch_size', 'seed', 'data'),
    'manifest': SEARCH_FLAGS + ('image', 'namespace'),
}


# How each mode is chosen, for the error line of a flag given in a mode that ignores it.
MODE_SWITCHES = {'trial': 'trial mode (neither --local nor --katib-experiment)', 'local': '--local (tune here)',
                 'manifest': '--katib-experiment (write the Katib Experiment)'}


def misplaced_flag_message(name, mode):
    """The error line for --name given in a mode that ignores it, naming the mode it needs and how to choose it."""
    if mode != 'trial' and name in TUNED_NAMES:
        return f'--{name} does not apply in {mode} mode (narrow the search space with --space NAME=MIN:MAX:STEP)'
    needed = ' or '.join(MODE_SWITCHES[other] for other in MODE_FLAGS if other != mode and name in MODE_FLAGS[other])
    return f'--{name} does not apply in {mode} mode; it needs {needed}'


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose error line quotes the user's text with its line breaks escaped, so that a value
    (a path, say) cannot start a line of its own, such as a metric line of a trial."""

    def error(self, message):
        super().error(trial_output.single_line(message))


def accuracy_goal(text):
    """An argparse type for --goal: a test accuracy in (0, 1]."""
    try:
        goal = float(text)
    except ValueError:
        goal = None
    if goal is None or not 0.0 < goal <= 1.0:
        raise argparse.ArgumentTypeError(f'must be a test accuracy in (0, 1], got {text!r}')
    return goal


def parse_arguments():
    """Parses the command line and fills in each mode's defaults; returns (mode, args)."""
    parser = OneLineErrorParser(
        description=__doc__.split('\n\n')[0],
        epilog='Modes: trial mode (default) trains one trial; --katib-experiment writes the Katib manifest; --local '
               'tunes on this machine.')
    mode_group = parser.add_mutually_exclusive_group()
    mode_group.add_argument('--katib-experiment', action='store_true',
                            help='manifest mode: write the Katib v1beta1 Experiment YAML to -o FILE (default: stdout)')
    mode_group.add_argument('--local', action='store_true',
                            help='local mode: tune on this machine in parallel worker processes')
    trial = parser.add_argument_group('trial mode (--batch_size, --seed and --data also apply in local mode)')
    mnist.add_hyperparameter_arguments(trial)
    trial.add_argument('--log_dir', default='', help="TensorBoard log folder (default: '' = no logs)")
    trial.add_argument('--export_dir', default=None,
                       help='also export the SavedModel under this base folder (default: no export)')
    trial.add_argument('--model_version', type=mnist.non_negative_int, default=0,
                       help='export version (default: %(default)s = the next free one)')
    # An exported trial reaches the serving folder under the same promotion rule as mnist.py.
    mnist.add_promotion_arguments(trial)
    search = parser.add_argument_group('local and manifest modes')
    search.add_argument('-o', '--output', default=None,
                        help='manifest mode: YAML file (default: stdout); local mode: results folder '
                             '(default: tuning/<UTC date-time>)')
    search.add_argument('--algorithm', default='random', choices=KATIB_ALGORITHMS,
                        help='search algorithm (default: %(default)s); local mode offers random and grid (the grid '
                             'in order, last parameter fastest)')
    search.add_argument('--max_trials', type=mnist.positive_int, default=TRIAL_COUNT_DEFAULTS['max_trials'],
                        help='number of trials, Katib maxTrialCount (default: %(default)s)')
    search.add_argument('--parallel', type=mnist.positive_int, default=None,
                        help=f'trials at a time, Katib parallelTrialCount (default: {TRIAL_COUNT_DEFAULTS["parallel"]} '
                             f'in the manifest, {LOCAL_PARALLEL_DEFAULT} locally; local trials share the CPU cores)')
    search.add_argument('--max_failed_trials', type=mnist.positive_int,
                        default=TRIAL_COUNT_DEFAULTS['max_failed_trials'],
                        help='stop after this many failed trials, Katib maxFailedTrialCount (default: %(default)s)')
    search.add_argument('--goal', type=accuracy_goal, default=DEFAULT_GOAL,
                        help='objective goal: the test accuracy to reach (default: %(default)s)')
    search.add_argument('--space', action='append', default=[], metavar='NAME=MIN:MAX:STEP',
                        help='narrow one parameter of the search space, e.g. --space epoch=1000:2000:500 '
                             '(repeatable; default: the table in SEARCH_SPACE)')
    local = parser.add_argument_group('local mode (--seed seeds both the proposals and every trial\'s training)')
    local.add_argument('--stop_at_goal', action='store_true',
                       help='start no more trials once one reaches --goal, and stop the running ones')
    cluster = parser.add_argument_group('manifest mode')
    cluster.add_argument('--image', default=DEFAULT_IMAGE, help='trial image, the demo notebook image '
                                                                '(default: %(default)s)')
    cluster.add_argument('--namespace', default=DEFAULT_NAMESPACE,
                         help="Experiment namespace (default: %(default)s; '' = leave it out and use kubectl -n)")
    # Parsing into a namespace whose mode-specific values are None keeps argparse from filling in defaults, so a flag
    # given in a mode that ignores it can be told apart from one left at its default.
    flag_names = sorted(set().union(*MODE_FLAGS.values()))
    args = parser.parse_args(namespace=argparse.Namespace(**{name: None for name in flag_names}))

    mode = 'manifest' if args.katib_experiment else 'local' if args.local else 'trial'
    misplaced = [name for name in flag_names if name not in MODE_FLAGS[mode] and getattr(args, name) is not None]
    if misplaced:
        parser.error(misplaced_flag_message(misplaced[0], mode))
    for name in flag_names:
        if getattr(args, name) is None:
            setattr(args, name, parser.get_default(name))
    if args.parallel is None:
        args.parallel = LOCAL_PARALLEL_DEFAULT if mode == 'local' else TRIAL_COUNT_DEFAULTS['parallel']
    if mode == 'trial':
        if args.export_dir is None and mnist.promotion_rule_from(args) != mnist.PROMOTION_DEFAULTS:
            parser.error('--min_accuracy, --min_improvement and --force_export apply to an export: give --export_dir')
        return mode, args
    try:
        args.space = override_space(SEARCH_SPACE, args.space)
    except ValueError as error:
        parser.error(str(error))
    if mode == 'local' and args.algorithm not in LOCAL_ALGORITHMS:
        parser.error(f'--algorithm {args.algorithm} runs on Katib only; local mode offers '
                     f'{" and ".join(LOCAL_ALGORITHMS)}')
    if args.algorithm == 'grid' and args.max_trials > count_combinations(args.space):
        parser.error(f'--max_trials {args.max_trials} exceeds the {count_combinations(args.space)} grid points of the '
                     f'search space (Katib rejects that too)')
    if mode == 'manifest' and max(args.parallel, args.max_failed_trials) > args.max_trials:
        parser.error('--parallel and --max_failed_trials must not exceed --max_trials (Katib rejects that)')
    return mode, args


def main():
    mode, args = parse_arguments()
    if mode == 'trial':
        # TensorFlow's start-up notices say nothing a trial's reader can act on (mnist.py quiets them the same way).
        os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
        hparams = mnist.hyperparameters_from(args)
        return run_trial(args.data, hparams, args.log_dir, args.export_dir, args.model_version,
                         mnist.promotion_rule_from(args))
    if mode == 'local':
        return tune_command(args)
    trial_counts = {name: getattr(args, name) for name in TRIAL_COUNT_DEFAULTS}
    experiment = build_experiment(args.space, args.algorithm, trial_counts, args.goal,
                                  build_trial_template(args.space, args.image), args.namespace)
    text = experiment_yaml(experiment, sys.argv[1:], args.output)
    if not args.output:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, 'w') as manifest_file:
            manifest_file.write(text)
    except OSError as error:
        print(f'error: cannot write {args.output}: {error.strerror}', file=sys.stderr)
        return 1
    print(f'Wrote the Katib Experiment {EXPERIMENT_NAME} to {args.output}', file=sys.stderr)
    return 0


def tune_command(args):
    """Local mode from the parsed flags: check the data, run the trials, report; returns the exit code."""
    output_dir = args.output or os.path.join('tuning', time.strftime('%Y%m%d-%H%M%S', time.gmtime()))
    if os.path.exists(os.path.join(output_dir, 'results.json')):
        print(f'error: {output_dir} already holds results.json; choose another --output', file=sys.stderr)
        return 1
    try:
        os.makedirs(output_dir, exist_ok=True)
        check_data(args.data)
    except (ValueError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    trials = propose_trials(args.space, args.algorithm, args.max_trials, args.seed)
    # Flags every trial shares, and the ones the retrain command needs to reproduce the best trial.
    extra_flags = [] if args.data == mnist.DEFAULT_DATA else [f'--data={args.data}']
    for name in ('batch_size', 'seed'):
        if getattr(args, name) != mnist.HYPERPARAMETER_DEFAULTS[name]:
            extra_flags.append(f'--{name}={getattr(args, name)}')
    common_flags = [f'--data={args.data}', f'--batch_size={args.batch_size}', f'--seed={args.seed}']
    print(f'Tuning: {len(trials)} trials ({args.algorithm}, seed {args.seed}), {args.parallel} at a time; results in '
          f'{output_dir}', flush=True)
    stop_rule = {'goal': args.goal, 'stop_at_goal': args.stop_at_goal, 'max_failed_trials': args.max_failed_trials}
    records, stop_reason = tune_locally(trials, common_flags, output_dir, args.parallel, stop_rule)
    if stop_reason:
        print(f'Stopped: {stop_reason}')
    if records:
        print('\n' + leaderboard(records))
    print(f'\nResults: {os.path.join(output_dir, "results.csv")} and results.json; TensorBoard: tensorboard --logdir '
          f'{os.path.join(output_dir, "tensorboard")}')
    succeeded = [record for record in records if record['status'] == 'succeeded']
    if not succeeded:
        print('error: no trial succeeded; see the logs in ' + os.path.join(output_dir, 'trials'), file=sys.stderr)
        return 130 if stop_reason == 'interrupted' else 1
    best = max(succeeded, key=lambda record: record['accuracy'])
    best_hparams = {name: best[name] for name in TUNED_NAMES}
    print(f'\nBest trial {best["trial"]}: accuracy {best["accuracy"]:.4f}. Retrain with the tuned values:')
    print(retrain_command(best_hparams, extra_flags))
    if stop_reason == 'interrupted':
        return 130
    # Like a Katib Experiment that hit maxFailedTrialCount, a run that stopped on failures is a failed run.
    return 1 if sum(record['status'] == 'failed' for record in records) >= args.max_failed_trials else 0


if __name__ == '__main__':
    sys.exit(main())
