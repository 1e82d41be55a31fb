"""Kubeflow Pipelines v2 pipeline for the MNIST demo: compile it to KFP IR YAML, run it locally with kfp.local, or
upload, run and schedule it with the kfp 2 client. The same command line as mnist_pipeline.py (KFP v1), plus --image.

Needs the second environment (requirements-kfp2.txt: the shared base plus kfp 2.17.3 and kfp-kubernetes 2.17.3);
kfp 1.8 and kfp 2 are both the package `kfp`, so they cannot share one environment. For KFP backends 2.x (Kubeflow
1.10 and later); mnist_pipeline.py stays for KFP 1.x backends and for 2.x installs that still accept v1 pipelines.

The steps are the trainer's own modules -- load_data -> train -> evaluate -> export [-> promote], each a file beside
this one -- embedded verbatim in each component's program (component_source.py) beside a thin adapter that imports
the step function from its module and maps the v2 artifact types (Input[Dataset], Output[Model], Output[Metrics],
Output[ClassificationMetrics]) to the step's file paths and logs the metrics the v2 run page shows; an adapter holds
no step logic, and tests/test_pipeline_v2.py checks that its parameters and defaults are the step's. Every step runs in our own image (Dockerfile.kfp2:
TensorFlow and the pinned kfp 2) with kfp's run-time `pip install` turned off, and with caching off.

Delivery: with serving_pvc set, a dsl.If runs the promote step with that claim mounted (kfp-kubernetes mount_pvc)
at /mnt/serving; it applies the promotion rule to <claim>/<serving_path>. A local run maps the claim to --serving_dir.

    python3 mnist_model/mnist_pipeline_v2.py                 # compile mnist_model/mnist_pipeline_v2.yaml
    python3 mnist_model/mnist_pipeline_v2.py --run-local --serving_dir mnist_model   # run here with kfp.local
    python3 mnist_model/mnist_pipeline_v2.py --host http://localhost:8080 --image <registry>/mnist-pipeline-kfp2:1.0.0 \\
        --upload --run --wait --schedule
"""
import contextlib
import datetime
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from typing import NamedTuple

try:
    import kfp
    import kfp.local
    from kfp import compiler, dsl, kubernetes
    from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output
except ImportError as error:
    # kfp 1.8 (the main environment) has no kfp.local or kfp.kubernetes: say which python to use, not a traceback.
    raise SystemExit(f'mnist_pipeline_v2.py: error: needs the kfp 2 environment (requirements-kfp2.txt) and this '
                     f'python lacks it ({error}); run it with ~/.cache/mnist-demo-venv-kfp2/bin/python or '
                     f'$MNIST_KFP2_PYTHON') from None
import kfp_server_api

import component_source
import mnist
import pipeline_cli
from pipeline_cli import PIPELINE_NAME, SERVING_MOUNT

# Our image for the steps, built from Dockerfile.kfp2 into your registry (`--image` sets it): TensorFlow 2.20 and
# kfp 2.17.3 (the v2 executor that runs a lightweight component), so nothing is installed when a pod starts. The
# committed IR keeps the placeholder; a pod with it fails with InvalidImageName until the image is set.
IMAGE_PLACEHOLDER = '<registry>/mnist-pipeline-kfp2:1.0.0'
PACKAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist_pipeline_v2.yaml')
POLL_SECONDS = 10
DEFAULTS = mnist.HYPERPARAMETER_DEFAULTS
RULE_DEFAULTS = mnist.PROMOTION_DEFAULTS


# ------------------------------------------------------------------------------------------------------ adapters
# Each adapter imports its step function from the step's module: inside the component that module is the one embedded
# in the program, here it is the file beside this one.

def load_data_step(data: str, dataset: Output[Dataset]):
    """load_data.load_data, writing the dataset artifact."""
    from load_data import load_data

    load_data(data, dataset.path)


def train_step(dataset: Input[Dataset], model: Output[Model], num_hidden_layer_1: int = 128,
               num_hidden_layer_2: int = 256, dropout: float = 1.0, learning_rate: float = 0.01, epoch: int = 2000,
               batch_size: int = 256, seed: int = 0, log_dir: str = ''):
    """train.train, from the dataset artifact into the model artifact."""
    from train import train

    train(dataset.path, model.path, num_hidden_layer_1=num_hidden_layer_1, num_hidden_layer_2=num_hidden_layer_2,
          dropout=dropout, learning_rate=learning_rate, epoch=epoch, batch_size=batch_size, seed=seed,
          log_dir=log_dir)


def evaluate_step(dataset: Input[Dataset], model: Input[Model], evaluation: Output[Artifact],
                  metrics: Output[Metrics], confusion_matrix: Output[ClassificationMetrics]
                  ) -> NamedTuple('EvaluateOutputs', [('accuracy', float), ('loss', float)]):
    """evaluate.evaluate; its results JSON becomes the evaluation artifact, and accuracy (a fraction), loss and the
    confusion matrix go to the v2 run page as Metrics and ClassificationMetrics. The KFP v1 run-page files it also
    writes stay beside the evaluation artifact."""
    import json
    import os

    from evaluate import evaluate

    kfp_v1_dir = os.path.join(os.path.dirname(evaluation.path), 'kfp-v1')
    accuracy, loss = evaluate(dataset.path, model.path, evaluation.path,
                              os.path.join(kfp_v1_dir, 'mlpipeline-metrics.json'),
                              os.path.join(kfp_v1_dir, 'mlpipeline-ui-metadata.json'))
    with open(evaluation.path) as results:
        confusion = json.load(results)['confusion_matrix']
    metrics.log_metric('accuracy', accuracy)
    metrics.log_metric('loss', loss)
    confusion_matrix.log_confusion_matrix([str(digit) for digit in range(10)], confusion)
    return accuracy, loss


def export_step(model: Input[Model], evaluation: Input[Artifact], export_dir: Output[Model]):
    """export.export: the candidate SavedModel as a model artifact."""
    from export import export

    export(model.path, evaluation.path, export_dir.path)


def promote_step(export_dir: Input[Model], dataset: Input[Dataset], serving_dir: str, metrics: Output[Metrics],
                 min_accuracy: float = 0.0, min_improvement: float = 0.0, max_digit_drop: float = 0.03,
                 min_test_examples: int = 1000, force_export: bool = False, model_version: int = 0
                 ) -> NamedTuple('PromoteOutputs', [('promoted', bool), ('model_version', int), ('decision', str)]):
    """promote.promote into serving_dir, judged on the dataset artifact's test split; the decision goes to the run
    page as Metrics (promoted 1/0, model-version and both models' measured accuracies) and as the step's output
    parameters. The KFP v1 run-page files it also writes (with the per-digit table) stay beside the metrics
    artifact."""
    import json
    import os

    from promote import promote

    kfp_v1_dir = os.path.join(os.path.dirname(metrics.path), 'kfp-v1')
    result = promote(export_dir.path, dataset.path, serving_dir, os.path.join(kfp_v1_dir, 'mlpipeline-metrics.json'),
                     os.path.join(kfp_v1_dir, 'mlpipeline-ui-metadata.json'), min_accuracy=min_accuracy,
                     min_improvement=min_improvement, max_digit_drop=max_digit_drop,
                     min_test_examples=min_test_examples, force_export=force_export, model_version=model_version)
    with open(os.path.join(kfp_v1_dir, 'mlpipeline-metrics.json')) as run_metrics:
        for metric in json.load(run_metrics)['metrics']:
            metrics.log_metric(metric['name'], metric['numberValue'])
    return result


# The adapter of each step, by component name: the name of its task in the IR, the same as in the v1 pipeline.
ADAPTERS = {'load-data': load_data_step, 'train': train_step, 'evaluate': evaluate_step, 'export': export_step,
            'promote': promote_step}


def component_from_adapter(name: str, adapter, image: str):
    """A v2 lightweight component named name: the adapter, with the step's modules embedded verbatim before it in
    its program, in the image, with kfp's run-time pip install turned off (the image holds kfp)."""
    component = dsl.component(adapter, base_image=image, install_kfp_package=False)
    container = component.component_spec.implementation.container
    container.command[-1] = component_source.embed_step(container.command[-1], name, adapter.__name__,
                                                        replace_function=False)
    # The task names of the v1 pipeline (load-data, ...), not the adapters' (load-data-step, ...).
    component.component_spec.name = component.name = name
    return component


def build_pipeline(image: str = IMAGE_PLACEHOLDER, serving_mount: str = SERVING_MOUNT):
    """The v2 pipeline with its steps in image. serving_mount is where the promote step finds the claim: SERVING_MOUNT
    on a cluster; a local run, which mounts nothing, passes its --serving_dir's parent folder."""
    components = {name: component_from_adapter(name, adapter, image) for name, adapter in ADAPTERS.items()}

    @dsl.pipeline(name=PIPELINE_NAME, description=pipeline_cli.PIPELINE_DESCRIPTION)
    def mnist_pipeline(num_hidden_layer_1: int = DEFAULTS['num_hidden_layer_1'],
                       num_hidden_layer_2: int = DEFAULTS['num_hidden_layer_2'],
                       dropout: float = DEFAULTS['dropout'],
                       learning_rate: float = DEFAULTS['learning_rate'],
                       epoch: int = DEFAULTS['epoch'],
                       batch_size: int = DEFAULTS['batch_size'],
                       seed: int = DEFAULTS['seed'],
                       data_url: str = pipeline_cli.DEFAULT_DATA_URL,
                       serving_pvc: str = '',
                       serving_path: str = pipeline_cli.DEFAULT_SERVING_PATH,
                       min_accuracy: float = RULE_DEFAULTS['min_accuracy'],
                       min_improvement: float = RULE_DEFAULTS['min_improvement'],
                       max_digit_drop: float = RULE_DEFAULTS['max_digit_drop'],
                       min_test_examples: int = RULE_DEFAULTS['min_test_examples'],
                       force_export: bool = RULE_DEFAULTS['force_export']):
        """Load MNIST, train the MLP, evaluate it on the test set and export a SavedModel; with serving_pvc, promote
        it into that claim's serving_path folder if it is at least as good as the version served there."""
        data = components['load-data'](data=data_url)
        model = components['train'](dataset=data.outputs['dataset'], num_hidden_layer_1=num_hidden_layer_1,
                                    num_hidden_layer_2=num_hidden_layer_2, dropout=dropout,
                                    learning_rate=learning_rate, epoch=epoch, batch_size=batch_size, seed=seed)
        evaluation = components['evaluate'](dataset=data.outputs['dataset'], model=model.outputs['model'])
        exported = components['export'](model=model.outputs['model'], evaluation=evaluation.outputs['evaluation'])
        tasks = [data, model, evaluation, exported]
        with dsl.If(serving_pvc != '', name='deliver'):
            # The gate measures the candidate and the served version on the run's own test split.
            promotion = components['promote'](export_dir=exported.outputs['export_dir'],
                                              dataset=data.outputs['dataset'],
                                              serving_dir=f'{serving_mount}/{serving_path}',
                                              min_accuracy=min_accuracy, min_improvement=min_improvement,
                                              max_digit_drop=max_digit_drop, min_test_examples=min_test_examples,
                                              force_export=force_export)
            # The claim's name is the run's parameter: the same compiled pipeline delivers to any notebook's volume.
            kubernetes.mount_pvc(promotion, pvc_name=serving_pvc, mount_path=SERVING_MOUNT)
            tasks.append(promotion)
        # A scheduled weekly run must really re-read the data and retrain, not reuse cached results of last week.
        for task in tasks:
            task.set_caching_options(False)

    return mnist_pipeline


def compile_pipeline(package_path: str, image: str = IMAGE_PLACEHOLDER) -> str:
    """Compile the pipeline to KFP v2 IR YAML (written atomically) and return its path."""
    folder = os.path.dirname(os.path.abspath(package_path))
    with tempfile.TemporaryDirectory(dir=folder, prefix='.compile-') as work_dir:
        temporary_path = os.path.join(work_dir, 'pipeline.yaml')
        compiler.Compiler().compile(build_pipeline(image), temporary_path)
        os.replace(temporary_path, package_path)
    return package_path


class _StepLog:
    """Reads what kfp.local prints while it runs the pipeline (its own log lines and each task's streamed output, all
    on stdout) and writes each task's output lines to stream, tagged with the task, as `[train] step 200/2000 ...`,
    without kfp's executor chatter. It keeps the last output line of each task for the error message of a failed
    step. It writes to the stream directly: kfp replaces builtins.print while a task runs."""
    LOG_LINE = re.compile(r'^\d\d:\d\d:\d\d\.\d{3} - [A-Z]+ - (.*)$')
    COLOUR = re.compile(r'\x1b\[[0-9;]*m')

    def __init__(self, stream):
        self.stream = stream
        self.task = None
        self.streaming = False
        self.in_executor_input = False
        self.last_line = {}
        self.task_dirs = {}
        self.failed = []
        self.partial = ''

    def write(self, text: str) -> int:
        lines = (self.partial + text).split('\n')
        self.partial = lines.pop()
        for line in lines:
            self._line(self.COLOUR.sub('', line))
        return len(text)

    def flush(self):
        pass

    def _line(self, line: str):
        log = self.LOG_LINE.match(line)
        if log:
            message = log.group(1)
            self.streaming = message.startswith('Streamed logs')
            started = re.match(r"Executing task '([^']+)'", message)
            if started:
                self.task = started.group(1)
                self._echo(f'[{self.task}] running')
            finished = re.match(r"Task '([^']+)' finished with status FAILURE", message)
            if finished:
                self.failed.append(finished.group(1))
            return
        if not self.streaming or not self.task:
            return
        # kfp indents a task's output by 4 spaces; the executor logs its input as an indented JSON block.
        content = line[4:] if line.startswith('    ') else line
        if self.in_executor_input:
            # The task's folder, from the place of its executor output: the run's folder is the one above it.
            output_file = re.match(r'\s*"outputFile": "(.*)/executor_output\.json"', content)
            if output_file:
                self.task_dirs[self.task] = output_file.group(1)
            self.in_executor_input = content != '}'
            return
        if content.startswith('[KFP Executor'):
            self.in_executor_input = content.endswith('Got executor_input:')
            return
        if content.strip():
            self.last_line[self.task] = content.strip()
            self._echo(f'[{self.task}] {content}')

    def _echo(self, line: str):
        self.stream.write(line + '\n')
        self.stream.flush()

    def failure(self) -> str:
        """The failed task and the last line of its output, which holds the exception and its one-line message."""
        task = self.failed[-1] if self.failed else self.task
        return f'step {task} failed: {self.last_line.get(task, "no error output")}'


def run_local(data: str, hparams: dict, pipeline_root: str, serving_dir: str = None, rule: dict = None,
              stream=None) -> dict:
    """Compile the pipeline into pipeline_root and run it here with kfp.local's SubprocessRunner (every step in its
    own Python process of this environment, no Docker); return the output paths and the test metrics. The steps'
    output lines go to stream (default: sys.stdout), tagged with the step.
    With serving_dir, the promote step applies the promotion rule (mnist.PROMOTION_DEFAULTS overridden by rule)
    to that folder, as it does to the serving_pvc claim on a cluster: kfp.local mounts no volumes, so the run's
    pipeline looks for the claim at serving_dir's parent folder and serving_path is serving_dir's name.

    Raises RuntimeError with a one-line message if a step fails.
    """
    pipeline_root = os.path.abspath(pipeline_root)
    os.makedirs(pipeline_root, exist_ok=True)
    # The package a cluster would run, beside the outputs: a local run checks that the pipeline compiles, too.
    package_path = compile_pipeline(os.path.join(pipeline_root, 'mnist_pipeline_v2.yaml'))
    if serving_dir:
        serving_dir = os.path.abspath(serving_dir)
        pipeline = build_pipeline(serving_mount=os.path.dirname(serving_dir))
        delivery = {'serving_pvc': pipeline_cli.LOCAL_CLAIM, 'serving_path': os.path.basename(serving_dir)}
    else:
        pipeline, delivery = build_pipeline(), {'serving_pvc': ''}
    arguments = dict(hparams, data_url=data, **delivery, **{**RULE_DEFAULTS, **(rule or {})})
    # Each step writes its program to `mktemp -d`: keep those files, and TensorFlow's, inside the run's folder.
    scratch_dir = tempfile.mkdtemp(prefix='.tmp-', dir=pipeline_root)
    saved_environment = {name: os.environ.get(name) for name in ('TMPDIR', 'TF_CPP_MIN_LOG_LEVEL')}
    os.environ['TMPDIR'] = scratch_dir
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    step_log = _StepLog(stream or sys.stdout)
    try:
        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root,
                       workspace_root=os.path.join(scratch_dir, 'workspace'))
        with warnings.catch_warnings(), contextlib.redirect_stdout(step_log):
            # kfp.local warns about every task that its image is not a python:* image; the steps need only this
            # environment, which holds what the image holds.
            warnings.simplefilter('ignore', RuntimeWarning)
            pipeline(**arguments)
    except RuntimeError:
        raise RuntimeError(step_log.failure()) from None
    finally:
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(scratch_dir, ignore_errors=True)
    # From what the run printed rather than the newest folder: another run may be writing into pipeline_root too.
    run_dir = os.path.dirname(step_log.task_dirs['load-data'])
    run_name = os.path.basename(run_dir)

    def task_output(task: str) -> dict:
        with open(os.path.join(run_dir, task, 'executor_output.json'), encoding='utf-8') as output_file:
            return json.load(output_file)

    outputs = {
        'package': package_path,
        'dataset': os.path.join(run_dir, 'load-data', 'dataset'),
        'model': os.path.join(run_dir, 'train', 'model'),
        'evaluation': os.path.join(run_dir, 'evaluate', 'evaluation'),
        # The Metrics and ClassificationMetrics artifacts live in the task's output metadata, as on a cluster.
        'evaluate_output': os.path.join(run_dir, 'evaluate', 'executor_output.json'),
        'export_dir': os.path.join(run_dir, 'export', 'export_dir'),
    }
    evaluated = task_output('evaluate')['parameterValues']
    summary = {'run_id': run_name, 'outputs': outputs, 'accuracy': evaluated['accuracy'],
               'loss': evaluated['loss'], 'promoted': None, 'model_version': None, 'decision': None}
    if serving_dir:
        outputs['promote_output'] = os.path.join(run_dir, 'promote', 'executor_output.json')
        promotion = task_output('promote')['parameterValues']
        summary.update(promoted=promotion['promoted'], model_version=int(promotion['model_version']) or None,
                       decision=promotion['decision'])
    return summary


# ------------------------------------------------------------------------------------------------ cluster actions

def connect(host: str, namespace: str = None, needs_namespace: bool = False) -> 'kfp.Client':
    """A kfp 2 Client for the host, after checking that its v2 API answers and accepts the credentials.

    Experiments, runs and recurring runs of a multi-user Kubeflow live in the user's profile namespace: from
    --namespace, or (as kfp.Client finds it) the notebook pod's or ~/.config/kfp/context.json. With needs_namespace,
    ValueError if the cluster is multi-user and no namespace is known.
    """
    credentials = pipeline_cli.read_credentials(pipeline_cli.TOKEN_FILE)
    healthz = pipeline_cli.check_host(host, credentials, api_version='v2beta1')
    with warnings.catch_warnings():
        # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later": the healthz check above did that.
        warnings.simplefilter('ignore', FutureWarning)
        # kfp.Client treats namespace 'kubeflow' as "not given" and then uses ~/.config/kfp/context.json.
        client = kfp.Client(host=host, namespace=namespace or 'kubeflow', cookies=credentials['cookie'],
                            existing_token=credentials['token'])
    if needs_namespace and healthz.get('multi_user') and not client.get_user_namespace():
        raise ValueError(f'{host} is a multi-user Kubeflow: give --namespace <your profile namespace>, '
                         f'e.g. kubeflow-user-example-com')
    return client


def newest_version(client, pipeline_id: str) -> 'kfp_server_api.V2beta1PipelineVersion':
    """The pipeline's newest version by creation time (whether an upload moves the default depends on the server)."""
    versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by='created_at desc').pipeline_versions
    if not versions:
        raise LookupError(f'pipeline {PIPELINE_NAME} has no versions: upload one with --upload')
    return versions[0]


def upload_pipeline(client, package_path: str, echo=print) -> dict:
    """Upload the package as a new pipeline, or as a new version if the pipeline exists; return its ids."""
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(package_path, pipeline_name=PIPELINE_NAME,
                                          description=pipeline_cli.PIPELINE_DESCRIPTION)
        version = newest_version(client, pipeline.pipeline_id)
        echo(f'Uploaded pipeline {PIPELINE_NAME} (id {pipeline.pipeline_id})')
        return {'pipeline_id': pipeline.pipeline_id, 'version_id': version.pipeline_version_id}
    versions = pipeline_cli.list_all(
        lambda token: client.list_pipeline_versions(pipeline_id, page_token=token, page_size=100),
        'pipeline_versions')
    name = pipeline_cli.unique_version_name(pipeline_cli.VERSION_NAME, [version.display_name for version in versions])
    version = client.upload_pipeline_version(package_path, name, pipeline_id=pipeline_id,
                                             description=pipeline_cli.VERSION_DESCRIPTION)
    echo(f'Uploaded version {name} (id {version.pipeline_version_id}) of pipeline {PIPELINE_NAME} (id {pipeline_id})')
    return {'pipeline_id': pipeline_id, 'version_id': version.pipeline_version_id}


def find_pipeline(client, echo=print) -> dict:
    """The ids of the pipeline and of its newest version; LookupError if it was never uploaded."""
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        raise LookupError(f'pipeline {PIPELINE_NAME} not found: upload it first with --upload')
    version = newest_version(client, pipeline_id)
    echo(f'Using version {version.display_name} (id {version.pipeline_version_id}) of pipeline {PIPELINE_NAME}')
    return {'pipeline_id': pipeline_id, 'version_id': version.pipeline_version_id}


def schedule_pipeline(client, experiment_id: str, pipeline: dict, params: dict, echo=print):
    """Create the weekly recurring run unless one with its name exists in the experiment; return it."""
    recurring_runs = pipeline_cli.list_all(
        lambda token: client.list_recurring_runs(page_token=token, page_size=100, experiment_id=experiment_id),
        'recurring_runs')
    for recurring_run in recurring_runs:
        if recurring_run.display_name == pipeline_cli.SCHEDULE_NAME:
            echo(f'Recurring run {pipeline_cli.SCHEDULE_NAME} already exists (id {recurring_run.recurring_run_id}); '
                 f'not creating another')
            return recurring_run
    recurring_run = client.create_recurring_run(
        experiment_id, pipeline_cli.SCHEDULE_NAME, description=pipeline_cli.SCHEDULE_DESCRIPTION,
        interval_second=pipeline_cli.SCHEDULE_INTERVAL_SECONDS, max_concurrency=1, no_catchup=True, params=params,
        pipeline_id=pipeline['pipeline_id'], version_id=pipeline['version_id'])
    echo(f'Created recurring run {pipeline_cli.SCHEDULE_NAME} (id {recurring_run.recurring_run_id}): every '
         f'{pipeline_cli.SCHEDULE_INTERVAL_SECONDS} s, max concurrency 1, no catch-up')
    return recurring_run


def wait_for_run(client, run_id: str, timeout: float):
    """Poll the run every POLL_SECONDS until it finishes; return the final V2beta1Run. TimeoutError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.get_run(run_id)
        if (run.state or '').upper() in ('SUCCEEDED', 'FAILED', 'SKIPPED', 'CANCELED'):
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f'run {run_id} still {run.state or "pending"} after {timeout:.0f} s')
        time.sleep(POLL_SECONDS)


def run_cluster_actions(host: str, namespace: str, actions: set, params: dict, timeout: float, image: str) -> int:
    """Do the actions ('upload', 'run', 'schedule', 'wait') against the KFP v2 API at host; return the exit code."""
    host = host.rstrip('/')
    client = connect(host, namespace, needs_namespace=bool(actions & {'run', 'schedule'}))
    pipeline = None
    if 'upload' in actions:
        with tempfile.TemporaryDirectory(prefix='mnist-pipeline-v2-') as work_dir:
            pipeline = upload_pipeline(client, compile_pipeline(os.path.join(work_dir, 'mnist_pipeline_v2.yaml'),
                                                                image))
    if not actions & {'run', 'schedule'}:
        return 0
    pipeline = pipeline or find_pipeline(client)
    experiment = client.create_experiment(pipeline_cli.EXPERIMENT_NAME, namespace=namespace)
    run = None
    if 'run' in actions:
        run_name = f'{PIPELINE_NAME}-{datetime.datetime.now().strftime("%Y%m%d-%H%M%S")}'
        with contextlib.redirect_stdout(io.StringIO()):
            # kfp prints its own "Run details" line; ours below also names the experiment.
            run = client.run_pipeline(experiment.experiment_id, run_name, params=params,
                                      pipeline_id=pipeline['pipeline_id'], version_id=pipeline['version_id'])
        print(f'Started run {run.display_name} in experiment {pipeline_cli.EXPERIMENT_NAME}: '
              f'{host}/#/runs/details/{run.run_id}')
    if 'schedule' in actions:
        schedule_pipeline(client, experiment.experiment_id, pipeline, params)
    if run is not None and 'wait' in actions:
        run = wait_for_run(client, run.run_id, timeout)
        print(f'Run {run.display_name} finished: {run.state}; its metrics (accuracy, loss, confusion matrix, '
              f'promoted, model-version) are on the run page')
        if run.state.upper() != 'SUCCEEDED':
            return 1
    return 0


def main(argv=None) -> int:
    parser = pipeline_cli.build_parser(
        'Compile the MNIST KFP v2 pipeline (default), run it locally, or upload/run/schedule it on a Kubeflow '
        'Pipelines 2.x cluster.', PACKAGE_PATH, 'kfp.local\'s SubprocessRunner')
    parser.add_argument('--image', default=IMAGE_PLACEHOLDER,
                        help='the steps\' image, built from Dockerfile.kfp2 and pushed to your registry (default: '
                             '%(default)s, a placeholder); needed by --upload')
    args = parser.parse_args(argv)
    hparams, rule = pipeline_cli.check_arguments(parser, args, PACKAGE_PATH)
    compiles = args.upload or not (args.run_local or args.run or args.schedule)
    if args.image != IMAGE_PLACEHOLDER and not compiles:
        parser.error('--image is for compiling and --upload (a run uses the uploaded version; --run-local runs the '
                     'steps in this environment)')
    if args.upload and '<registry>' in args.image:
        parser.error('--upload needs --image <your registry>/mnist-pipeline-kfp2:1.0.0 (built from Dockerfile.kfp2)')

    def act():
        if args.run_local:
            return pipeline_cli.run_local_and_report(run_local, args.data, hparams, args.pipeline_root,
                                                     args.serving_dir, rule, args.keep_pipeline_root,
                                                     prefix='mnist-pipeline-v2-')
        if args.upload or args.run or args.schedule:
            return run_cluster_actions(args.host, args.namespace, pipeline_cli.cluster_actions(args),
                                       pipeline_cli.run_parameters(args, hparams, rule), args.timeout, args.image)
        print(f'Compiled {compile_pipeline(args.package, args.image)}')
        return 0

    return pipeline_cli.report_errors('mnist_pipeline_v2.py', args.host, act)


if __name__ == '__main__':
    sys.exit(main())
