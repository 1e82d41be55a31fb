"""Run the whole MNIST MLOps demo on this machine, offline and end to end, and leave a report a presenter can open.

The stages follow the demo's order, each one the repository's own command line in a process of its own:
train (the notebook's first `python3 mnist.py`) -> pipeline (the weekly pipeline run on a short budget, a quarter of
the training steps: compiled, run with kfp's LocalClient and delivered under the promotion rule, which declines its
worse model and keeps the served version), with tune beside it (the local tuner, started with the pipeline as a
Katib experiment runs beside scheduled pipeline runs; the pipeline's steps run one at a time, in one thread, and
leave the other core to the trials) -> retrain (with the best trial's values: served only if better), with serve
beside it (the local model server, up while the new model trains as a served model is: it loads the new version once
the gate promotes it, and is checked on the test set) -> notebook (model_serve.ipynb headless, and the ten test PNGs
sent to predict_image) -> drift (clean, then rotated test digits sent one by one: the drift monitor's scores and the
moment its alert starts) -> stop. Every new version goes to one serving folder, by default a fresh one inside the
report folder, so the demo never touches mnist_model/<versions> unless --serving_dir says so.

    python3 run_demo.py                  # the whole demo on the full data: about 2 minutes on 2 cores
    python3 run_demo.py --quick          # tiny sizes (a slice of the data, few steps): about a minute
    python3 run_demo.py --pipeline v2    # the pipeline stage with KFP v2 and kfp.local (the kfp 2 environment)

It prints a line when each stage starts and ends, the stages' own progress, and where the report is:
demo-report/<UTC date-time>/report.html (one self-contained page), summary.json (the same numbers) and logs/<stage>.log.
A failed stage stops the run with one line naming it and its log, and the report so far is still written.
"""
import argparse
import base64
import datetime
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

import demo_report

REPO = os.path.dirname(os.path.abspath(__file__))
# The trainer's modules import each other by name, as the pipeline components that embed them do.
sys.path.insert(0, os.path.join(REPO, 'mnist_model'))
import serving_folder  # noqa: E402 (after the path it is found on)
from pipeline_cli import KFP2_VENV, find_kfp2_python  # noqa: E402
MNIST_PY = os.path.join('mnist_model', 'mnist.py')
PIPELINE_PY = os.path.join('mnist_model', 'mnist_pipeline.py')
PIPELINE_V2_PY = os.path.join('mnist_model', 'mnist_pipeline_v2.py')
TUNER_PY = 'mnist_hyper_tuning.py'
SERVER_PY = os.path.join('mnist_model', 'model_server.py')
NOTEBOOK = 'model_serve.ipynb'
TEST_DIGITS = os.path.join(REPO, 'mnist_model', 'test_data')
BUNDLED_DATA = os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')
# The demo's steps with the cluster command that does each one on Kubeflow (placeholders in <>).
STAGES = (
    ('train', 'Train in a notebook', 'python3 mnist_model/mnist.py   # in the Kubeflow notebook\'s terminal'),
    ('pipeline', 'Weekly pipeline run on a short budget, run locally',
     'python3 mnist_model/mnist_pipeline.py --host <KFP URL> --upload --run --schedule --serving_pvc <notebook pvc>'),
    ('tune', 'Tune the hyperparameters, beside the pipeline run',
     'python3 mnist_hyper_tuning.py --katib-experiment --image <registry>/jupyter/mnist-tensorflow-cpu:1.0.0 '
     '--namespace <namespace> -o my-experiment.yaml && kubectl apply -f my-experiment.yaml'),
    ('retrain', 'Retrain with the tuned values', 'python3 mnist_model/mnist.py <the best trial\'s flags>   # in the '
     'notebook'),
    ('serve', 'Serve the model, the server started beside the retraining',
     "sed 's/<notebook-pvc>/<notebook pvc>/' mnist_model/kserve-inferenceservice.yaml | kubectl apply -n <namespace> "
     "-f -"),
    ('notebook', 'Ask the model from the notebook',
     'open model_serve.ipynb in the Kubeflow notebook, set URL to the InferenceService\'s :predict URL, run all'),
    ('drift', 'Watch the served model for drift',
     "sed 's/<notebook-pvc>/<notebook pvc>/; s|<registry>|<registry>|' mnist_model/drift-monitor.yaml | kubectl apply "
     "-n <namespace> -f -   # and uncomment the logger block of mnist_model/kserve-inferenceservice.yaml"),
    ('stop', 'Stop serving', 'kubectl delete inferenceservice mnist-model-server -n <namespace>'),
)
# The drift stage: clean test digits, then digits turned by 25-45 degrees (mnist_model/drift_shifts.py), one per
# request; the monitor's scores are read every DRIFT_LOOK requests, and the stage stops DRIFT_AFTER_ALERT requests
# after the alert started (docs/monitoring.md).
DRIFT_SHIFT, DRIFT_CLEAN, DRIFT_SHIFTED, DRIFT_LOOK, DRIFT_AFTER_ALERT = 'rotated', 300, 300, 25, 50
# Longest silence before a "still running" line: a little over the tuner's own 10 s, so that its progress lines
# are not doubled by ours.
QUIET_SECONDS = 11
# Training steps of the pipeline stage, a quarter of the first training's (mnist.py's default 2000, or 100 with
# --quick): the weekly run squeezed into a short slot. Its model is worse than the one served (0.95 against 0.97 on
# the full data, 0.77 against 0.87 quick), so the audience sees the promotion rule decline it.
SHORT_BUDGET_STEPS = {'full': 500, 'quick': 25}
OVERRIDE_FLAG = '--force_export'
# Lines of the stages' output that the terminal does not need (they stay in the logs): metric lines for Katib,
# the local pipeline's list of output paths, blank lines, nbconvert's and the notebook kernel's own messages.
NOISE = re.compile(r'^\s*$|^(accuracy|loss)=|^  \S+(?: \S+)?\s{2,}/|^Outputs\b|^Results: |^TensorBoard logs: |'
                   r'^\[IPKernelApp\]|^\[NbConvertApp\] |^(\[promote\] )?\|')
# A row of the per-digit table the promote step prints under its decision: "| 7 | 0.9712 | 0.9805 | +0.0093 |".
PER_DIGIT_ROW = re.compile(r'^(?:\[promote\] )?\| (\d|all) \|((?: [+-]?\d\.\d+ \|)+)$')
PER_DIGIT_HEAD = re.compile(r'^(?:\[promote\] )?\| digit \|((?: [^|]+ \|)+)$')
DECISION = re.compile(r'^(?:\[promote\] )?(Promoted|Forced|Not promoted): (?:version (\d+) )?.*?'
                      r'test accuracy (\d\.\d+)')
# What a declined candidate was measured against: "... is below 0.9731 of version 1, which stays in service".
BASELINE = re.compile(r'below (\d\.\d+) of version (\d+)')


def per_digit_table(lines):
    """The per-digit table at the head of lines (after the evidence line), as {'columns': [model names],
    'rows': [[digit or 'all', accuracies and change...]]}; None when there is none."""
    rows, columns = [], None
    for line in lines[:16]:
        head, row = PER_DIGIT_HEAD.match(line), PER_DIGIT_ROW.match(line)
        if head:
            columns = [cell.strip() for cell in head.group(1).split('|') if cell.strip()]
        elif row and columns:
            rows.append([row.group(1), *(float(cell) for cell in row.group(2).split('|') if cell.strip())])
        elif rows:
            break
    return {'columns': columns, 'rows': rows} if rows else None


class StageFailed(Exception):
    """A stage ended badly; the message is the one line the user sees."""


class RunningCommand:
    """A stage's command while it runs: its process, its log file, the lines it printed so far."""

    def __init__(self, name, process, log):
        self.name = name
        self.process = process
        self.log = log
        self.output = []
        self.thread = None
        self.started = self.last_shown = time.monotonic()


def display_path(path):
    """A path as a user types it from the repository's top folder."""
    relative = os.path.relpath(os.path.abspath(path), REPO)
    return path if relative.startswith(os.pardir) else relative


def raise_keyboard_interrupt(signal_number, frame):
    raise KeyboardInterrupt


def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def http_json(url, body=None, timeout=60):
    """GET (or POST body as JSON) and return (status, parsed reply or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, None
    except (OSError, ValueError):
        return 0, None


class Demo:
    """The state of one demo run: its folders, the summary the report is made from, and the running process."""

    def __init__(self, report_dir, serving_dir, quick, trials, parallel, echo=print, kfp2_python=None):
        self.report_dir = report_dir
        # With the python of the kfp 2 environment, the pipeline stage runs the KFP v2 pipeline instead of v1.
        self.kfp2_python = kfp2_python
        self.serving_dir = serving_dir
        self.quick = quick
        # Two stages' commands may print at once (the tuning runs beside the pipeline): one line at a time.
        echo_lock = threading.Lock()

        def echo_line(line):
            with echo_lock:
                echo(line)
        self.echo = echo_line
        self.running = []             # the RunningCommands started and not yet finished
        self.tuning = None            # the tuner's RunningCommand, from its start beside the pipeline to its end
        self.stage_started = {}       # stage name -> when it began, while it runs
        self.server = None            # the model server's process, from its start beside the retraining
        self.server_url = None
        self.server_started = None
        self.started = time.monotonic()
        self.data_flags = []
        self.summary = {
            'started_at': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
            'mode': 'quick' if quick else 'full', 'report_dir': display_path(report_dir),
            'serving_dir': display_path(serving_dir), 'trials': trials, 'parallel': parallel,
            'stages': [{'name': name, 'title': title, 'status': 'not run', 'seconds': None, 'commands': [],
                        'cluster_command': cluster, 'log': os.path.join('logs', f'{name}.log')}
                       for name, title, cluster in STAGES],
            'versions': [], 'tuning': None, 'served': None, 'notebook': None, 'predict_image': None,
        }

    def stage(self, name):
        return next(stage for stage in self.summary['stages'] if stage['name'] == name)

    # ------------------------------------------------------------------------------------------ running commands

    def start_command(self, name, argv, environment=None):
        """Start one command of a stage from the repository folder, with a thread copying its output to the stage's
        log and its progress to the terminal; finish_command waits for it."""
        stage = self.stage(name)
        stage['commands'].append(shlex.join(argv))
        log = open(os.path.join(self.report_dir, stage['log']), 'a', encoding='utf-8')
        log.write(f'$ {shlex.join(argv)}\n')
        log.flush()
        # Its own session: Ctrl-C reaches this script only, which then stops the stage in order.
        process = subprocess.Popen(
            [sys.executable if argv[0] == 'python3' else argv[0]] + argv[1:], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2', **(environment or {})))
        command = RunningCommand(name, process, log)
        command.thread = threading.Thread(target=self.copy_output, args=(command,), daemon=True)
        command.thread.start()
        self.running.append(command)
        return command

    def copy_output(self, command):
        """Every line of a command's output to its log and its list, and all but the noise to the terminal."""
        with command.log:
            for line in command.process.stdout:
                command.log.write(line)
                command.output.append(line.rstrip('\n'))
                if not NOISE.search(line):
                    self.echo(f'  [{command.name}] {line.rstrip()}')
                    command.last_shown = time.monotonic()

    def finish_command(self, command):
        """Wait for a started command, with a "still running" line after each quiet spell; returns its output lines.
        StageFailed if it exits non-zero."""
        while command.thread.is_alive():
            command.thread.join(1.0)
            if command.thread.is_alive() and time.monotonic() - command.last_shown >= QUIET_SECONDS:
                self.echo(f'  [{command.name}] still running: {time.monotonic() - command.started:.0f} s of wall '
                          'time so far')
                command.last_shown = time.monotonic()
        code = command.process.wait()
        self.running.remove(command)
        if code != 0:
            last = next((line for line in reversed(command.output) if line.strip()), 'no output')
            raise StageFailed(f'exit code {code}: {last.strip()[:300]}')
        return command.output

    def run_command(self, name, argv, environment=None):
        """Run one command of a stage and return its output lines (start_command, then finish_command)."""
        return self.finish_command(self.start_command(name, argv, environment))

    def stop_process(self, process, signal_number=signal.SIGINT, timeout=30):
        """Stop a stage's process group as Ctrl-C would, so it cleans up; kill it if it does not end in time."""
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal_number)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass

    def served_version(self):
        """The version the serving folder serves now (the largest one a server loads: promote's definition), or None
        while the folder has none or does not exist yet."""
        return max(serving_folder.versions(self.serving_dir), default=None)

    def record_decisions(self, name, output, served_before):
        """Add the promotion decisions a stage printed to the list of versions and candidates, each with the
        per-digit table printed under it; a declined one is shown with both accuracies, the override flag and the
        version still served. (What the promote step printed is shown, never decided on.)"""
        served_after = self.served_version()
        for index, line in enumerate(output):
            match = DECISION.match(line)
            if not match:
                continue
            kind, version, accuracy = match.groups()
            entry = {'version': int(version) if version else None, 'accuracy': float(accuracy), 'source': name,
                     'decision': kind.lower(), 'message': line.split('] ', 1)[-1], 'served_before': served_before,
                     'served_after': served_after}
            self.summary['versions'].append(entry)
            entry['per_digit'] = per_digit_table(output[index + 1:])
            baseline = BASELINE.search(line)
            if entry['decision'] == 'not promoted' and baseline:
                entry.update(baseline_accuracy=float(baseline.group(1)), baseline_version=int(baseline.group(2)),
                             override=OVERRIDE_FLAG)
                # Another process may have promoted meanwhile: say what is served, not what should be.
                served = f'version {served_after} is still served' if served_after == served_before else \
                    f'version {served_after} is served now'
                self.echo(f'  [{name}] declined: its model scored {entry["accuracy"]:.4f}, below the '
                          f'{entry["baseline_accuracy"]:.4f} of version {entry["baseline_version"]}; {served}. '
                          f'{OVERRIDE_FLAG} would have exported it anyway.')

    # ------------------------------------------------------------------------------------------------ the stages

    def prepare_data(self):
        """Full mode trains on the bundled data; quick mode on a slice of it, written into the report folder."""
        if not self.quick:
            self.test_data = BUNDLED_DATA
            return
        path = os.path.join(self.report_dir, 'data', 'mnist-quick.npz')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with np.load(BUNDLED_DATA, allow_pickle=False) as full:
            np.savez(path, x_train=full['x_train'][:3000], y_train=full['y_train'][:3000],
                     x_test=full['x_test'][:1000], y_test=full['y_test'][:1000])
        self.test_data = path
        self.data_flags = [f'--data={display_path(path)}']

    def steps_flags(self):
        return ['--epoch=100'] if self.quick else []

    def output_flags(self):
        """Where a training run of the demo exports to and logs to."""
        return [f'--export_dir={display_path(self.serving_dir)}',
                f'--log_dir={display_path(os.path.join(self.report_dir, "tensorboard"))}']

    def train(self):
        served_before = self.served_version()
        output = self.run_command('train', ['python3', MNIST_PY, *self.data_flags, *self.steps_flags(),
                                            *self.output_flags()])
        self.record_decisions('train', output, served_before)

    def pipeline(self):
        # The local run compiles the pipeline first: the package it runs lands in <pipeline_root>/mnist_pipeline.yaml.
        command = ['python3', PIPELINE_PY]
        if self.kfp2_python:
            command = [self.kfp2_python, PIPELINE_V2_PY]
            stage = self.stage('pipeline')
            stage['title'] = 'Weekly pipeline run (KFP v2) on a short budget, run locally'
            stage['cluster_command'] = ('python3 mnist_model/mnist_pipeline_v2.py --host <KFP URL> --image '
                                        '<registry>/mnist-pipeline-kfp2:1.0.0 --upload --run --schedule '
                                        '--serving_pvc <notebook pvc>')
        steps = SHORT_BUDGET_STEPS[self.summary['mode']]
        served_before = self.served_version()
        against = f'whether it replaces version {served_before}' if served_before else 'whether it is served'
        self.echo(f'  [pipeline] the weekly run, on a short budget: --epoch={steps}, a quarter of the first '
                  f'training\'s steps; the promotion rule decides {against}')
        output = self.run_command('pipeline', [
            *command, '--run-local', *self.data_flags, f'--epoch={steps}',
            f'--pipeline_root={display_path(os.path.join(self.report_dir, "pipeline"))}',
            f'--serving_dir={display_path(self.serving_dir)}'])
        self.record_decisions('pipeline', output, served_before)

    def start_tune(self):
        """Start the local tuner; tune() waits for it. It runs beside the pipeline stage, as a Katib experiment
        runs beside the scheduled pipeline runs on a cluster: the pipeline's steps, one at a time, leave a core
        idle."""
        output_dir = os.path.join(self.report_dir, 'tuning')
        # Quick runs tune small, short trials; the full run searches the demo's whole space.
        space = ['--space=epoch=100:200:100', '--space=num_hidden_layer_1=64:128:64',
                 '--space=num_hidden_layer_2=64:128:64'] if self.quick else []
        self.tuning = self.start_command('tune', [
            'python3', TUNER_PY, '--local', f'--max_trials={self.summary["trials"]}',
            f'--parallel={self.summary["parallel"]}', '--seed=0', *space, *self.data_flags,
            f'--output={display_path(output_dir)}'])

    def tune(self):
        """Wait for the tuner started beside the pipeline and read its results."""
        self.finish_command(self.tuning)
        output_dir = os.path.join(self.report_dir, 'tuning')
        with open(os.path.join(output_dir, 'results.json'), encoding='utf-8') as results_file:
            results = json.load(results_file)
        succeeded = [trial for trial in results['trials'] if trial['status'] == 'succeeded']
        if not succeeded:
            raise StageFailed('no trial succeeded')
        best = max(succeeded, key=lambda trial: trial['accuracy'])
        self.summary['tuning'] = {'trials': results['trials'], 'best': best['trial'],
                                  'goal': results['objective']['goal'], 'results': display_path(output_dir)}

    def retrain(self):
        best_name = self.summary['tuning']['best']
        best = next(trial for trial in self.summary['tuning']['trials'] if trial['trial'] == best_name)
        names = ('num_hidden_layer_1', 'num_hidden_layer_2', 'dropout', 'learning_rate', 'epoch')
        flags = [f'--{name}={best[name]}' for name in names]
        served_before = self.served_version()
        output = self.run_command('retrain', ['python3', MNIST_PY, *flags, *self.data_flags, *self.output_flags()])
        self.record_decisions('retrain', output, served_before)

    def start_server(self):
        """Start the local model server on a free port over the serving folder; serve() waits for it. It starts
        beside the retraining, as a served model keeps serving while its successor trains: it loads the version served
        now, and the new one once the gate promotes it (it looks at the folder every second)."""
        port = free_port()
        argv = ['python3', SERVER_PY, f'--rest_api_port={port}', f'--model_base_path={display_path(self.serving_dir)}']
        self.stage('serve')['commands'] = [shlex.join(argv)]
        with open(os.path.join(self.report_dir, self.stage('serve')['log']), 'a', encoding='utf-8') as log:
            log.write(f'$ {shlex.join(argv)}\n')
            log.flush()
            self.server = subprocess.Popen([sys.executable] + argv[1:], cwd=REPO, stdout=log, stderr=log,
                                           start_new_session=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
        self.server_url = f'http://127.0.0.1:{port}/v1/models/mnist'
        self.server_started = time.monotonic()

    def wait_for_version(self, version):
        """Wait until the server's newest AVAILABLE version is `version`; False if it exits or 120 s pass first."""
        last_shown, deadline = time.monotonic(), time.monotonic() + 120
        while self.server.poll() is None and time.monotonic() < deadline:
            status, reply = http_json(self.server_url, timeout=5)
            available = [item['version'] for item in (reply or {}).get('model_version_status', [])
                         if item['state'] == 'AVAILABLE']
            # Newest first; the version before it may be AVAILABLE too, loaded as the server's warm standby.
            if available[:1] == [str(version)]:
                return True
            if time.monotonic() - last_shown >= QUIET_SECONDS:
                self.echo(f'  [serve] waiting for version {version}: {time.monotonic() - self.server_started:.0f} s '
                          'since the server started')
                last_shown = time.monotonic()
            time.sleep(0.2)
        return False

    def serve(self):
        """Wait until the server started beside the retraining serves the newest version, and measure the served
        model on the test set through its REST API."""
        newest = self.served_version()
        if newest is None:
            raise StageFailed(f'no version to serve in {display_path(self.serving_dir)}')
        served = False
        for _ in range(3):
            # A port taken between choosing it and binding it: the server exits, and starts again on another one.
            if self.server is None or self.server.poll() is not None:
                self.start_server()
            served = self.wait_for_version(newest)
            if served or self.server.poll() is None:
                break
        if not served:
            raise StageFailed(f'the model server did not serve version {newest}')
        url = self.server_url
        self.summary['served'] = {'url': url, 'pid': self.server.pid, 'version': newest}
        self.echo(f'  [serve] serving version {newest} at {url} (pid {self.server.pid})')

        with np.load(self.test_data, allow_pickle=False) as data:
            images, labels = data['x_test'].reshape(-1, 784), data['y_test'].astype(np.int64)
        # In random order, as users would send them: MNIST's test file holds one group of writers after another,
        # and the drift monitor would rightly see the last 200 of them as unlike the test set as a whole.
        order = np.random.default_rng(0).permutation(len(labels))
        images, labels = images[order], labels[order]
        predictions = []
        for start in range(0, len(images), 1000):
            status, reply = http_json(url + ':predict', {'instances': images[start:start + 1000].tolist()})
            if status != 200:
                raise StageFailed(f'the model server answered HTTP {status} to a batch of test images')
            predictions += [row['digit'] for row in reply['predictions']]
        predictions = np.array(predictions)
        confusion = np.bincount(labels * 10 + predictions, minlength=100).reshape(10, 10)
        with open(os.path.join(self.serving_dir, str(newest), 'assets.extra', 'run.json'), encoding='utf-8') as file:
            record = json.load(file)
        self.summary['served'].update(
            accuracy=float(np.mean(predictions == labels)), recorded_accuracy=record['accuracy'],
            test_examples=len(labels), confusion_matrix=confusion.tolist(), hyperparameters=record['hyperparameters'])
        self.echo(f'  [serve] test accuracy through the server {self.summary["served"]["accuracy"]:.4f} on '
                  f'{len(labels)} images (run.json says {record["accuracy"]:.4f})')

    def notebook(self):
        url = self.summary['served']['url']
        notebook_dir = os.path.join(self.report_dir, 'notebook')
        self.run_command('notebook', ['python3', '-m', 'jupyter', 'nbconvert', '--to', 'notebook', '--execute',
                                      NOTEBOOK, f'--output-dir={display_path(notebook_dir)}'],
                         environment={'MNIST_PREDICT_URL': url + ':predict'})
        with open(os.path.join(notebook_dir, NOTEBOOK), encoding='utf-8') as file:
            executed = json.load(file)
        outputs = [output for cell in executed['cells'] for output in cell.get('outputs', [])]
        texts = [''.join(output.get('text', '')) for output in outputs]
        figures = [output['data']['image/png'] for output in outputs if 'image/png' in output.get('data', {})]
        tables = [''.join(output['data']['text/markdown']) for output in outputs
                  if 'text/markdown' in output.get('data', {})]
        answers = [line for text in texts for line in text.splitlines() if line.startswith(('sent ', 'predict_image'))]
        self.summary['notebook'] = {'executed': display_path(os.path.join(notebook_dir, NOTEBOOK)),
                                    'lines': answers, 'figure_png': figures[0] if figures else None,
                                    'table_markdown': tables[0] if tables else None}
        if not figures or not answers:
            problem = next((line for text in texts for line in text.splitlines() if line.strip()), 'no output')
            raise StageFailed(f'the notebook got no answer from the server: {problem}')

        # The ten test digits as files, to the signature that takes pictures.
        pictures = [open(os.path.join(TEST_DIGITS, f'{digit}.png'), 'rb').read() for digit in range(10)]
        body = {'signature_name': 'predict_image',
                'instances': [{'b64': base64.b64encode(picture).decode('ascii')} for picture in pictures]}
        status, reply = http_json(url + ':predict', body)
        if status != 200:
            raise StageFailed(f'predict_image answered HTTP {status}')
        self.summary['predict_image'] = [
            {'sent': digit, 'digit': row['digit'], 'confidence': max(row['probabilities']),
             'png': base64.b64encode(picture).decode('ascii')}
            for digit, (picture, row) in enumerate(zip(pictures, reply['predictions']))]
        right = sum(answer['sent'] == answer['digit'] for answer in self.summary['predict_image'])
        self.echo(f'  [notebook] predict_image: {right} of 10 test PNGs recognised: '
                  f'{[answer["digit"] for answer in self.summary["predict_image"]]}')

    def drift(self):
        """Send clean test digits and then rotated ones to the running server, one per request as users do, and
        follow the drift monitor's scores (GET /monitoring/drift) until its alert starts."""
        from drift_shifts import apply_shift

        url = self.summary['served']['url']
        drift_url = url.split('/v1/')[0] + '/monitoring/drift'
        with np.load(self.test_data, allow_pickle=False) as data:
            order = np.random.default_rng(0).permutation(len(data['y_test']))[:DRIFT_CLEAN + DRIFT_SHIFTED]
            digits, labels = data['x_test'][order], data['y_test'][order]
        digits[DRIFT_CLEAN:] = apply_shift(DRIFT_SHIFT, digits[DRIFT_CLEAN:], seed=0)
        self.stage('drift')['commands'] = [f'curl {drift_url}']
        points, correct, alert_at, state = [], [0, 0], None, None
        calm_before_shift = True
        try:
            for index, digit in enumerate(digits):
                status, reply = http_json(url + ':predict', {'instances': [digit.reshape(784).tolist()]})
                if status != 200:
                    raise StageFailed(f'the model server answered HTTP {status} to a predict')
                correct[index >= DRIFT_CLEAN] += reply['predictions'][0]['digit'] == labels[index]
                if (index + 1) % DRIFT_LOOK:
                    continue
                state = self.drift_state(drift_url)
                version = state['versions'][0]
                scores = {name: signal['score'] for name, signal in
                          version['signatures']['serving_default']['signals'].items()}
                points.append({'sent': index + 1, 'scores': scores, 'alert': version['alert']})
                if index + 1 == DRIFT_CLEAN and version['alert']:
                    calm_before_shift = False
                    self.echo('  [drift] an alert from earlier traffic is still on after the clean digits: the moment '
                              'of a new one cannot be shown')
                if version['alert'] and alert_at is None and index >= DRIFT_CLEAN and calm_before_shift:
                    alert_at = index + 1 - DRIFT_CLEAN
                    over = ', '.join(f'{name} {score:.1f}' for name, score in scores.items()
                                     if score is not None and score >= version['signatures']['serving_default']
                                     ['signals'][name]['threshold'])
                    self.echo(f'  [drift] alert after {alert_at} {DRIFT_SHIFT} digits: {over} over the threshold')
                if alert_at is not None and index + 1 - DRIFT_CLEAN >= alert_at + DRIFT_AFTER_ALERT:
                    break
        finally:
            self.write_drift_log(points, state)
        shifted_sent = max(0, index + 1 - DRIFT_CLEAN)
        clean_scores = [score for point in points if point['sent'] <= DRIFT_CLEAN
                        for score in point['scores'].values() if score is not None]
        self.summary['drift'] = {
            'shift': DRIFT_SHIFT, 'clean_sent': DRIFT_CLEAN, 'shifted_sent': shifted_sent,
            'window': state['window'], 'step': state['step'], 'points': points, 'alert_after': alert_at,
            'clean_accuracy': correct[0] / DRIFT_CLEAN, 'shifted_accuracy': correct[1] / max(1, shifted_sent),
            'thresholds': {name: signal['threshold'] for name, signal in
                           state['versions'][0]['signatures']['serving_default']['signals'].items()},
            'url': drift_url}
        self.echo(f'  [drift] {DRIFT_CLEAN} clean test digits: highest score {max(clean_scores, default=0):.1f}, '
                  f'accuracy {correct[0] / DRIFT_CLEAN:.3f}; {shifted_sent} {DRIFT_SHIFT} ones: accuracy '
                  f'{correct[1] / max(1, shifted_sent):.3f}, alert '
                  f'{"after " + str(alert_at) if alert_at else "not started"}')
        if not calm_before_shift:
            raise StageFailed(f'an alert from earlier traffic was still on after {DRIFT_CLEAN} clean digits')
        if alert_at is None:
            raise StageFailed(f'the drift monitor raised no alert for {shifted_sent} {DRIFT_SHIFT} digits')
        self.echo('  [drift] next: look at which signals moved (curl .../monitoring/drift), label a sample of these '
                  'requests, retrain with them (docs/monitoring.md)')

    def write_drift_log(self, points, state):
        """The drift stage's log: the scores at every look, and the monitor's last state as it answered it."""
        with open(os.path.join(self.report_dir, self.stage('drift')['log']), 'w', encoding='utf-8') as log:
            for point in points:
                phase = 'clean' if point['sent'] <= DRIFT_CLEAN else DRIFT_SHIFT
                scores = ' '.join(f'{name} {score:.2f}' for name, score in point['scores'].items() if score is not None)
                log.write(f'after {point["sent"]} requests ({phase}): alert {point["alert"]}; {scores}\n')
            log.write(f'GET /monitoring/drift at the end:\n{json.dumps(state, indent=1)}\n')

    def drift_state(self, drift_url):
        """GET /monitoring/drift once the monitor has processed every request sent."""
        for _ in range(100):
            status, state = http_json(drift_url)
            if status != 200:
                raise StageFailed(f'GET /monitoring/drift answered HTTP {status}')
            if state['queued_inputs'] == 0 and state['versions']:
                return state
            time.sleep(0.02)
        raise StageFailed('the drift monitor did not catch up within 2 s')

    def stop(self, keep_serving):
        stage = self.stage('stop')
        with open(os.path.join(self.report_dir, stage['log']), 'w', encoding='utf-8') as log:
            if keep_serving:
                stage['commands'] = ['(left running: --keep_serving)']
                log.write(f'The model server (pid {self.server.pid}) was left running: --keep_serving\n')
                return
            stage['commands'] = [f'kill -TERM {self.server.pid}']
            log.write(f'$ kill -TERM {self.server.pid}\n')
            self.stop_process(self.server, signal.SIGTERM)
            log.write(f'The model server exited with code {self.server.returncode}; its output is in '
                      f'{self.stage("serve")["log"]}\n')
        if self.server.returncode != 0:
            raise StageFailed(f'the model server exited with code {self.server.returncode}')

    # -------------------------------------------------------------------------------------------------- the run

    def write_report(self):
        """Write summary.json and report.html (each atomically) from what has run so far. seconds is the run's wall
        time from its start to this report (what the console's last line says too); stage_seconds the sum of the
        stages' own wall times, more than seconds since two stages run beside others (BESIDE)."""
        self.summary['seconds'] = round(time.monotonic() - self.started, 1)
        self.summary['stage_seconds'] = round(sum(stage['seconds'] or 0 for stage in self.summary['stages']), 1)
        documents = {'summary.json': json.dumps(self.summary, indent=2) + '\n',
                     'report.html': demo_report.render(self.summary)}
        for name, text in documents.items():
            temporary = os.path.join(self.report_dir, f'.{name}.tmp')
            with open(temporary, 'w', encoding='utf-8') as file:
                file.write(text)
            os.replace(temporary, os.path.join(self.report_dir, name))

    # Stages started with another one, to run beside it: (stage, the method that starts it).
    BESIDE = {'pipeline': ('tune', 'start_tune'), 'retrain': ('serve', 'start_server')}

    def begin(self, name):
        stage = self.stage(name)
        self.echo(f'[{name}] {stage["title"]} ...')
        stage['status'] = 'running'
        self.stage_started[name] = time.monotonic()

    def end(self, name, status, error=None):
        stage = self.stage(name)
        stage['status'] = status
        if error:
            stage['error'] = error
        stage['seconds'] = round(time.monotonic() - self.stage_started.pop(name), 1)

    def stop_running(self, status, error):
        """Stop every command still running (a stage started beside the one that stopped the run) and mark its
        stage."""
        for command in list(self.running):
            self.stop_process(command.process)
            self.running.remove(command)
        for stage in self.summary['stages']:
            if stage['status'] == 'running':
                self.end(stage['name'], status, error)

    def run(self, keep_serving):
        """Run every stage in order, each stage of BESIDE started with its partner (the tuning with the pipeline,
        the server with the retraining); returns the exit code (0, 1 for a failed stage, 130 for Ctrl-C)."""
        self.started = time.monotonic()
        os.makedirs(os.path.join(self.report_dir, 'logs'), exist_ok=True)
        self.prepare_data()
        steps = [('train', self.train), ('pipeline', self.pipeline), ('tune', self.tune),
                 ('retrain', self.retrain), ('serve', self.serve), ('notebook', self.notebook),
                 ('drift', self.drift), ('stop', lambda: self.stop(keep_serving))]
        code = 0
        for name, step in steps:
            try:
                if self.stage(name)['status'] != 'running':
                    self.begin(name)
                if name in self.BESIDE:
                    beside, start = self.BESIDE[name]
                    self.begin(beside)
                    getattr(self, start)()
                step()
                self.end(name, 'succeeded')
            except StageFailed as error:
                self.end(name, 'failed', str(error))
                print(f'run_demo.py: error: stage {name} failed: {error} (log: '
                      f'{display_path(os.path.join(self.report_dir, self.stage(name)["log"]))})', file=sys.stderr,
                      flush=True)
                self.stop_running('stopped', f'stopped: stage {name} failed')
                code = 1
            except KeyboardInterrupt:
                self.echo(f'[{name}] interrupted: stopping ...')
                self.stop_running('interrupted', None)
                code = 130
            if code:
                break
            self.echo(f'[{name}] done in {self.stage(name)["seconds"]:.1f} s of wall time')
            self.write_report()
        if code:
            # Nothing keeps running after a failure or Ctrl-C: the server is stopped too.
            self.stop_process(self.server, signal.SIGTERM)
            self.summary['served'] = self.summary['served'] and dict(self.summary['served'], pid=None)
            # The report so far, with the stage that stopped the run marked (a finished run wrote it after its
            # last stage).
            self.write_report()
        return code


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'must be an integer >= 1, got {text!r}')
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='run_demo.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes for a smoke run: a slice of the data, few steps, 2 trials (under a minute)')
    parser.add_argument('--trials', type=positive_int, default=None,
                        help='tuning trials (default: 6, or 2 with --quick)')
    parser.add_argument('--parallel', type=positive_int, default=2, help='trials at a time (default: %(default)s)')
    parser.add_argument('--output', default=None,
                        help='report folder, new or empty (default: demo-report/<UTC date-time>)')
    parser.add_argument('--serving_dir', default=None,
                        help='the serving folder every stage promotes into (default: <output>/serving, a fresh one; '
                             'mnist_model to serve the demo\'s own folder)')
    parser.add_argument('--keep_serving', action='store_true',
                        help='leave the model server running at the end and print its URL and PID')
    parser.add_argument('--pipeline', choices=('v1', 'v2'), default='v1',
                        help='the pipeline stage\'s Kubeflow Pipelines version (default: %(default)s); v2 runs '
                             'mnist_pipeline_v2.py with the python of the kfp 2 environment: $MNIST_KFP2_PYTHON, '
                             f'else {KFP2_VENV}/bin/python (.ci/run builds it from requirements-kfp2.txt)')
    args = parser.parse_args(argv)
    kfp2_python = find_kfp2_python() if args.pipeline == 'v2' else None
    if args.pipeline == 'v2' and kfp2_python is None:
        parser.error(f'--pipeline v2 needs the kfp 2 environment: set MNIST_KFP2_PYTHON to its python, or build '
                     f'{KFP2_VENV} (python3 -m venv {KFP2_VENV} && {KFP2_VENV}/bin/pip install -r '
                     f'requirements-kfp2.txt)')
    trials = args.trials or (2 if args.quick else 6)
    report_dir = args.output or os.path.join(
        'demo-report', datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S'))
    if os.path.exists(report_dir) and (not os.path.isdir(report_dir) or os.listdir(report_dir)):
        print(f'run_demo.py: error: {report_dir} exists and is not an empty folder: choose another --output',
              file=sys.stderr)
        return 1
    serving_dir = args.serving_dir or os.path.join(report_dir, 'serving')
    try:
        os.makedirs(os.path.join(report_dir, 'logs'), exist_ok=True)
        os.makedirs(serving_dir, exist_ok=True)
    except OSError as error:
        print(f'run_demo.py: error: cannot create {error.filename}: {error.strerror}', file=sys.stderr)
        return 1

    # A `kill` of this script stops the demo as Ctrl-C does: the running stage and the server first.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    demo = Demo(os.path.abspath(report_dir), os.path.abspath(serving_dir), args.quick, trials, args.parallel,
                echo=lambda line: print(line, flush=True), kfp2_python=kfp2_python)
    mode = 'quick: a slice of the data, few steps' if args.quick else 'the full data'
    print(f'MNIST MLOps demo ({mode}); report in {report_dir}, serving folder {serving_dir}', flush=True)
    code = demo.run(args.keep_serving)
    report = os.path.join(report_dir, 'report.html')
    outcome = {0: 'finished', 1: 'stopped by a failed stage', 130: 'interrupted'}[code]
    # The same figure as the report's: the run's wall time up to its last report.
    print(f'Demo {outcome} in {demo.summary["seconds"]:.1f} s of wall time. Report: {report} (open it in a browser); '
          f'numbers: {os.path.join(report_dir, "summary.json")}')
    if code == 0 and args.keep_serving:
        print(f'The model server is still running: {demo.summary["served"]["url"]} (pid {demo.server.pid}); '
              f'stop it with: kill {demo.server.pid}')
    return code


if __name__ == '__main__':
    sys.exit(main())
