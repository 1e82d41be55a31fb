"""Kubeflow Pipelines (v1) pipeline for the MNIST demo: compile it, run it locally, upload, run and schedule it.

The pipeline is the trainer's own steps -- load_data -> train -> evaluate -> export [-> promote], each a module
beside this file -- as lightweight components (kfp 1.8 `create_component_from_func`) whose program embeds the step's
module files verbatim (component_source.py), running in a pinned TensorFlow image with no run-time pip installs
(air-gapped clusters have no PyPI). Steps pass files (npz, Keras model folder, JSON, SavedModel
folder); only the hyperparameters travel as parameters. The evaluate step writes `mlpipeline_metrics` (accuracy as a
percentage, loss) and `mlpipeline_ui_metadata` (confusion matrix and a markdown summary) for the run's page.

Delivery: with the parameter serving_pvc set to a PersistentVolumeClaim, the promote step mounts that claim and applies
mnist.py's promotion rule to the new model, copying it into <claim>/<serving_path> as the next version only if it is at
least as good as the version served there -- so the weekly schedule keeps the InferenceService's TF Serving fresh with
no redeploy. Its decision shows on the run's page (a markdown line, metrics `promoted` 1/0 and `model-version`).
With serving_pvc empty (the default) the export stays a run artifact.

    cd mnist_model && python3 mnist_pipeline.py          # compile mnist_pipeline.yaml (the file the KFP UI uploads)
    python3 mnist_pipeline.py --run-local                # run the same pipeline here with kfp's LocalClient
    python3 mnist_pipeline.py --run-local --serving_dir mnist_model   # ... and promote into a local serving folder
    python3 mnist_pipeline.py --host http://localhost:8080 --upload --run --wait --schedule

Cluster actions (each on its own or together; order: upload, run, schedule, then wait):
  --upload    uploads pipeline `mnist-image-classification-pipeline`; if it exists, uploads a new version named
              `mnist-template` (then `mnist-template-2`, `-3`, ... since KFP needs version names unique per pipeline).
  --run       starts a run of the pipeline's newest version (or the one just uploaded) in experiment `MNIST`
              (created if missing) and prints its URL; --wait waits for it and prints the status and metrics.
  --schedule  creates the weekly recurring run `mnist-pipeline-schedule` (max concurrency 1, no catch-up) unless a
              recurring run with that name already exists in the experiment.
Authentication for multi-user Kubeflow: KF_PIPELINES_COOKIE="authservice_session=..." (the browser's session
cookie; "oauth2_proxy_kubeflow=..." on Kubeflow 1.9+) or KF_PIPELINES_TOKEN=<bearer token>; in a Kubeflow notebook
with the "Allow access to Kubeflow Pipelines" configuration the projected token file
/var/run/secrets/kubeflow/pipelines/token is used automatically.
"""
import datetime
import importlib.util
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import warnings

import kfp
import kfp_server_api
import yaml
from kfp import components, dsl
from kfp.components._yaml_utils import dump_yaml
from kubernetes import client as k8s_client

import component_source
import mnist
import pipeline_cli
# The names on the cluster, the command line and the authentication are shared with mnist_pipeline_v2.py.
from pipeline_cli import (DEFAULT_DATA_URL, DEFAULT_SERVING_PATH, EXPERIMENT_NAME, LOCAL_CLAIM, PIPELINE_DESCRIPTION,
                          PIPELINE_NAME, SCHEDULE_DESCRIPTION, SCHEDULE_INTERVAL_SECONDS, SCHEDULE_NAME, SERVING_MOUNT,
                          VERSION_DESCRIPTION, VERSION_NAME, check_host, list_all, read_credentials,
                          unique_version_name)

# The steps need only TensorFlow 2.20 (requirements-base.txt pins tensorflow-cpu 2.20.0), its NumPy and the standard
# library: every step runs in this stock image with nothing installed at run time.
BASE_IMAGE = 'tensorflow/tensorflow:2.20.0'
PACKAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist_pipeline.yaml')
COMPILATION_TIME_ANNOTATION = 'pipelines.kubeflow.org/pipeline_compilation_time'
TOKEN_FILE = pipeline_cli.TOKEN_FILE
POLL_SECONDS = 10


def component_from_step(name):
    """The KFP v1 component of the step `name` (component_source.STEP_MODULES): kfp 1.8's lightweight component of
    the step function, for its interface and its thin entry point (argparse from the container's arguments to the
    function's parameters, and the returned values to output files), with kfp's copy of the function replaced by the
    step's modules embedded verbatim. kfp reads the interface from a stub of the step function (its signature and
    docstring), so that compiling the pipeline imports neither the step nor TensorFlow."""
    module_name = component_source.STEP_MODULES[name][-1]
    with tempfile.TemporaryDirectory(prefix='mnist-component-') as folder:
        stub_path = os.path.join(folder, f'{module_name}.py')
        with open(stub_path, 'w', encoding='utf-8') as stub_file:
            stub_file.write(component_source.signature_stub(name))
        specification = importlib.util.spec_from_file_location(f'_signature_of_{module_name}', stub_path)
        stub = importlib.util.module_from_spec(specification)
        specification.loader.exec_module(stub)
        factory = components.create_component_from_func(getattr(stub, module_name), base_image=BASE_IMAGE)
    container = factory.component_spec.implementation.container
    program = component_source.embed_step(container.command[-1], name, module_name, replace_function=True)
    # kfp 1.8 parses bool arguments with distutils, which Python 3.12 removed; this parser accepts the same words.
    container.command[-1] = program.replace(
        '    from distutils.util import strtobool\n    return strtobool(s) == 1',
        "    return {'y': True, 'yes': True, 't': True, 'true': True, 'on': True, '1': True, 'n': False, 'no': False,\n"
        "            'f': False, 'false': False, 'off': False, '0': False}[s.lower()]")
    return factory


load_data_op = component_from_step('load-data')
train_op = component_from_step('train')
evaluate_op = component_from_step('evaluate')
export_op = component_from_step('export')
promote_op = component_from_step('promote')

DEFAULTS = mnist.HYPERPARAMETER_DEFAULTS
RULE_DEFAULTS = mnist.PROMOTION_DEFAULTS


@dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
def mnist_pipeline(num_hidden_layer_1: int = DEFAULTS['num_hidden_layer_1'],
                   num_hidden_layer_2: int = DEFAULTS['num_hidden_layer_2'],
                   dropout: float = DEFAULTS['dropout'],
                   learning_rate: float = DEFAULTS['learning_rate'],
                   epoch: int = DEFAULTS['epoch'],
                   batch_size: int = DEFAULTS['batch_size'],
                   seed: int = DEFAULTS['seed'],
                   data_url: str = DEFAULT_DATA_URL,
                   serving_pvc: str = '',
                   serving_path: str = DEFAULT_SERVING_PATH,
                   min_accuracy: float = RULE_DEFAULTS['min_accuracy'],
                   min_improvement: float = RULE_DEFAULTS['min_improvement'],
                   max_digit_drop: float = RULE_DEFAULTS['max_digit_drop'],
                   min_test_examples: int = RULE_DEFAULTS['min_test_examples'],
                   force_export: bool = RULE_DEFAULTS['force_export']):
    """Load MNIST, train the MLP, evaluate it on the test set and export a SavedModel; with serving_pvc, promote it
    into that claim's serving_path folder if the gate finds it better than the version served there, both measured
    on this run's test split.

    dropout is the KEEP probability (1.0 = no dropout); epoch is the number of training steps (mini-batches).
    """
    data = load_data_op(data=data_url)
    model = train_op(dataset=data.outputs['dataset'], num_hidden_layer_1=num_hidden_layer_1,
                     num_hidden_layer_2=num_hidden_layer_2, dropout=dropout, learning_rate=learning_rate,
                     epoch=epoch, batch_size=batch_size, seed=seed)
    evaluation = evaluate_op(dataset=data.outputs['dataset'], model=model.outputs['model'])
    exported = export_op(model=model.outputs['model'], metrics=evaluation.outputs['metrics'])
    tasks = [data, model, evaluation, exported]
    with dsl.Condition(serving_pvc != '', name='deliver'):
        # The gate measures the candidate and the served version on the run's own test split.
        promotion = promote_op(export_dir=exported.outputs['export_dir'], dataset=data.outputs['dataset'],
                               serving_dir=f'{SERVING_MOUNT}/{serving_path}', min_accuracy=min_accuracy,
                               min_improvement=min_improvement, max_digit_drop=max_digit_drop,
                               min_test_examples=min_test_examples, force_export=force_export)
        # The claim's name is the run's parameter: the same compiled pipeline delivers to any notebook's volume.
        promotion.add_volume(k8s_client.V1Volume(
            name='serving', persistent_volume_claim=k8s_client.V1PersistentVolumeClaimVolumeSource(
                claim_name=serving_pvc)))
        promotion.container.add_volume_mount(k8s_client.V1VolumeMount(name='serving', mount_path=SERVING_MOUNT))
        tasks.append(promotion)
    # A scheduled weekly run must really re-read the data and retrain, not reuse cached results of the last week.
    for task in tasks:
        task.execution_options.caching_strategy.max_cache_staleness = 'P0D'


def compile_pipeline(package_path: str) -> str:
    """Compile the pipeline to a KFP v1 YAML package (written atomically) and return its path."""
    folder = os.path.dirname(os.path.abspath(package_path))
    with tempfile.TemporaryDirectory(dir=folder, prefix='.compile-') as work_dir:
        temporary_path = os.path.join(work_dir, 'pipeline.yaml')
        kfp.compiler.Compiler().compile(mnist_pipeline, temporary_path)
        with open(temporary_path, encoding='utf-8') as package:
            workflow = yaml.safe_load(package)
        # kfp stamps the compile time into the Workflow; without it the committed YAML regenerates identically.
        # dump_yaml is the writer kfp's compiler uses, so the rest of the file is byte for byte kfp's output.
        del workflow['metadata']['annotations'][COMPILATION_TIME_ANNOTATION]
        with open(temporary_path, 'w', encoding='utf-8') as package:
            package.write(dump_yaml(workflow))
        os.replace(temporary_path, package_path)
    return package_path


class _StepLog(logging.Handler):
    """Collects what kfp's LocalClient logs: it names each task, then logs the task's stdout and stderr."""

    def __init__(self, echo):
        super().__init__(logging.INFO)
        self.echo = echo
        self.task = None
        self.stderr = {}

    def emit(self, record):
        if not record.name == 'root' or not isinstance(record.msg, str):
            return
        if record.msg.startswith('start task'):
            self.task = str(record.args[0]) if record.args else record.getMessage()
            self.echo(f'[{self.task}] running')
        elif record.levelno == logging.INFO and self.task:
            for line in record.getMessage().splitlines():
                self.echo(f'[{self.task}] {line}')
        elif record.levelno >= logging.ERROR and self.task:
            self.stderr[self.task] = record.getMessage()

    def failure(self) -> str:
        """The last line of the failed task's stderr, which holds the exception and its one-line message."""
        lines = [line for line in self.stderr.get(self.task, '').splitlines() if line.strip()]
        return f'step {self.task} failed: {lines[-1] if lines else "no error output"}'


class _LocalClient(kfp.LocalClient):
    """kfp 1.8's LocalClient, with the mlpipeline_metrics and mlpipeline_ui_metadata outputs kept in the run's folder,
    dsl.Condition honoured, and volume mounts mapped to local folders.

    kfp treats those two outputs specially and its LocalClient leaves them at the literal /tmp/outputs/... paths of
    the container, shared by every local run on the machine; this puts them next to the step's other outputs and
    records where: special_outputs[(op name, 'mlpipeline-metrics' or 'mlpipeline-ui-metadata')] = path.
    LocalClient runs the steps of a dsl.Condition whatever its value; here a condition on the run's arguments (a plain
    value once the pipeline function is called with them) decides. mounts maps a container path, such as the claim
    mounted at SERVING_MOUNT, to the local folder that stands for it.
    """

    def __init__(self, pipeline_root: str, mounts: dict = None):
        super().__init__(pipeline_root=pipeline_root)
        self.special_outputs = {}
        self.mounts = mounts or {}

    def _generate_cmd_for_subprocess_execution(self, run_name, pipeline, op, stack):
        command = super()._generate_cmd_for_subprocess_execution(run_name, pipeline, op, stack)
        for output_name, container_path in op.output_artifact_paths.items():
            local_path = self._make_output_file_path_unique(run_name, op.name, container_path)
            os.makedirs(os.path.dirname(local_path), exist_ok=True)
            command = [local_path if item == container_path else item for item in command]
            self.special_outputs[op.name, output_name] = local_path
        for container_path, local_path in self.mounts.items():
            command = [local_path + item[len(container_path):]
                       if item == container_path or item.startswith(container_path + '/') else item
                       for item in command]
        return command

    def _run_group(self, run_name, pipeline, pipeline_dag, current_group, stack, execution_mode):
        # The pipeline's conditions compare run arguments, which are plain values here: a plain bool.
        if current_group.type == 'condition' and current_group.condition is False:
            return True
        # kfp 1.8 returns None for a group whose steps all succeeded, which its caller takes for a failed subgroup.
        return super()._run_group(run_name, pipeline, pipeline_dag, current_group, stack, execution_mode) is not False


def run_local(data: str, hparams: dict, pipeline_root: str, echo=print, serving_dir: str = None,
              rule: dict = None) -> dict:
    """Compile the pipeline into pipeline_root and run it in local processes with kfp's LocalClient; return the
    output paths and the test metrics.
    With serving_dir, the promote step applies the promotion rule (mnist.PROMOTION_DEFAULTS overridden by rule)
    to that folder, as it does to the serving_pvc claim on a cluster.

    Raises RuntimeError with a one-line message if a step fails.
    """
    pipeline_root = os.path.abspath(pipeline_root)
    os.makedirs(pipeline_root, exist_ok=True)
    # The package a cluster would run, beside the outputs: a local run checks that the pipeline compiles, too.
    package_path = compile_pipeline(os.path.join(pipeline_root, 'mnist_pipeline.yaml'))
    # LocalClient runs each step as `python3 <program>`: make that the interpreter running this script. A wrapper
    # rather than a symlink, so that a virtual environment's python still finds its pyvenv.cfg and packages.
    bin_dir = tempfile.mkdtemp(prefix='.python-', dir=pipeline_root)
    wrapper_path = os.path.join(bin_dir, 'python3')
    with open(wrapper_path, 'w', encoding='utf-8') as wrapper:
        wrapper.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    os.chmod(wrapper_path, 0o755)
    saved_environment = {name: os.environ.get(name) for name in ('PATH', 'TF_CPP_MIN_LOG_LEVEL', 'TMPDIR')}
    os.environ['PATH'] = bin_dir + os.pathsep + os.environ.get('PATH', '')
    # Each step's `mktemp` program file and TensorFlow's generated code go there too, and are removed with it.
    os.environ['TMPDIR'] = bin_dir
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    step_log = _StepLog(echo)
    root_logger = logging.getLogger()
    saved_level = root_logger.level
    root_logger.addHandler(step_log)
    root_logger.setLevel(logging.INFO)
    mounts = {SERVING_MOUNT: os.path.abspath(serving_dir)} if serving_dir else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)
            client = _LocalClient(pipeline_root=pipeline_root, mounts=mounts)
        arguments = dict(hparams, data_url=data, serving_pvc=LOCAL_CLAIM if serving_dir else '', serving_path='',
                         **{**mnist.PROMOTION_DEFAULTS, **(rule or {})})
        result = client.create_run_from_pipeline_func(
            mnist_pipeline, arguments=arguments,
            execution_mode=kfp.LocalClient.ExecutionMode(mode=kfp.LocalClient.ExecutionMode.LOCAL))
    finally:
        root_logger.removeHandler(step_log)
        root_logger.setLevel(saved_level)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(bin_dir, ignore_errors=True)
    if not result.success():
        raise RuntimeError(step_log.failure())
    outputs = {
        'package': package_path,
        'dataset': result.get_output_file('load-data', 'dataset'),
        'model': result.get_output_file('train', 'model'),
        'metrics': result.get_output_file('evaluate', 'metrics'),
        'mlpipeline_metrics': client.special_outputs['evaluate', 'mlpipeline-metrics'],
        'mlpipeline_ui_metadata': client.special_outputs['evaluate', 'mlpipeline-ui-metadata'],
        'export_dir': result.get_output_file('export', 'export_dir'),
    }
    with open(outputs['metrics'], encoding='utf-8') as metrics_file:
        metrics = json.load(metrics_file)
    summary = {'run_id': result.run_id, 'outputs': outputs, 'accuracy': metrics['accuracy'], 'loss': metrics['loss'],
               'promoted': None, 'model_version': None, 'decision': None}
    if serving_dir:
        outputs['promote_metrics'] = client.special_outputs['promote', 'mlpipeline-metrics']
        outputs['promote_ui_metadata'] = client.special_outputs['promote', 'mlpipeline-ui-metadata']
        promotion = {}
        for name in ('promoted', 'model_version', 'decision'):
            with open(result.get_output_file('promote', name), encoding='utf-8') as output_file:
                promotion[name] = output_file.read()
        summary.update(promoted=promotion['promoted'] == 'True', model_version=int(promotion['model_version']) or None,
                       decision=promotion['decision'])
    return summary


def connect(host: str, namespace: str = None, needs_namespace: bool = False) -> 'kfp.Client':
    """A kfp.Client for the host, after checking that it answers and accepts the credentials.

    Experiments, runs and schedules of a multi-user Kubeflow live in the user's profile namespace: from --namespace,
    or (as kfp.Client finds it) the notebook pod's service account or ~/.config/kfp/context.json. With
    needs_namespace, ValueError if the cluster is multi-user and no namespace is known.
    """
    credentials = read_credentials(TOKEN_FILE)
    healthz = check_host(host, credentials)
    # kfp.Client treats namespace 'kubeflow' as "not given" and then uses ~/.config/kfp/context.json.
    client = kfp.Client(host=host, namespace=namespace or 'kubeflow', cookies=credentials['cookie'],
                        existing_token=credentials['token'])
    if needs_namespace and healthz.get('multi_user') and not client.get_user_namespace():
        raise ValueError(f'{host} is a multi-user Kubeflow: give --namespace <your profile namespace>, '
                         f'e.g. kubeflow-user-example-com')
    return client


def upload_pipeline(client, package_path: str, echo=print) -> dict:
    """Upload the package as a new pipeline, or as a new version if the pipeline exists; return its ids."""
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(package_path, pipeline_name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
        version_id = pipeline.default_version.id if pipeline.default_version else None
        echo(f'Uploaded pipeline {PIPELINE_NAME} (id {pipeline.id})')
        return {'pipeline_id': pipeline.id, 'version_id': version_id}
    versions = list_all(lambda token: client.list_pipeline_versions(pipeline_id, page_token=token, page_size=100),
                        'versions')
    name = unique_version_name(VERSION_NAME, [version.name for version in versions])
    version = client.upload_pipeline_version(package_path, name, pipeline_id=pipeline_id,
                                             description=VERSION_DESCRIPTION)
    echo(f'Uploaded version {name} (id {version.id}) of pipeline {PIPELINE_NAME} (id {pipeline_id})')
    return {'pipeline_id': pipeline_id, 'version_id': version.id}


def find_pipeline(client, echo=print) -> dict:
    """The ids of the pipeline and of its newest version; LookupError if it was never uploaded.

    The newest by creation time, not the pipeline's default version: whether an upload moves the default depends on
    the KFP server's configuration.
    """
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        raise LookupError(f'pipeline {PIPELINE_NAME} not found: upload it first with --upload')
    versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by='created_at desc').versions
    if not versions:
        raise LookupError(f'pipeline {PIPELINE_NAME} has no versions: upload one with --upload')
    echo(f'Using version {versions[0].name} (id {versions[0].id}) of pipeline {PIPELINE_NAME}')
    return {'pipeline_id': pipeline_id, 'version_id': versions[0].id}


def start_run(client, experiment_id: str, pipeline: dict, params: dict) -> 'kfp_server_api.ApiRun':
    """Start one run of the pipeline version in the experiment."""
    run_name = f'{PIPELINE_NAME}-{datetime.datetime.now().strftime("%Y%m%d-%H%M%S")}'
    return client.run_pipeline(experiment_id, run_name, params=params, pipeline_id=pipeline['pipeline_id'],
                               version_id=pipeline['version_id'])


def schedule_pipeline(client, experiment_id: str, pipeline: dict, params: dict, echo=print):
    """Create the weekly recurring run unless one with its name exists in the experiment; return the job."""
    jobs = list_all(lambda token: client.list_recurring_runs(page_token=token, page_size=100,
                                                             experiment_id=experiment_id), 'jobs')
    for job in jobs:
        if job.name == SCHEDULE_NAME:
            echo(f'Recurring run {SCHEDULE_NAME} already exists (id {job.id}); not creating another')
            return job
    job = client.create_recurring_run(
        experiment_id, SCHEDULE_NAME, description=SCHEDULE_DESCRIPTION, interval_second=SCHEDULE_INTERVAL_SECONDS,
        max_concurrency=1, no_catchup=True, params=params, pipeline_id=pipeline['pipeline_id'],
        version_id=pipeline['version_id'])
    echo(f'Created recurring run {SCHEDULE_NAME} (id {job.id}): every {SCHEDULE_INTERVAL_SECONDS} s, '
         f'max concurrency 1, no catch-up')
    return job


def wait_for_run(client, run_id: str, timeout: float):
    """Poll the run every POLL_SECONDS until it finishes; return the final ApiRun. TimeoutError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.get_run(run_id).run
        if (run.status or '').lower() in ('succeeded', 'failed', 'error', 'skipped'):
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f'run {run_id} still {run.status or "pending"} after {timeout:.0f} s')
        time.sleep(POLL_SECONDS)


def format_run_metrics(run) -> str:
    """The metrics KFP read from the run's mlpipeline_metrics, e.g. 'accuracy 98.12 % | loss 0.0634'."""
    parts = []
    for metric in run.metrics or []:
        unit = ' %' if metric.format == 'PERCENTAGE' else ''
        parts.append(f'{metric.name} {metric.number_value:.4g}{unit}')
    return ' | '.join(parts) or 'no metrics reported'


def run_cluster_actions(host: str, namespace: str, actions: set, params: dict, timeout: float) -> int:
    """Do the actions ('upload', 'run', 'schedule', 'wait') against the KFP API at host; return the exit code."""
    host = host.rstrip('/')
    client = connect(host, namespace, needs_namespace=bool(actions & {'run', 'schedule'}))
    pipeline = None
    if 'upload' in actions:
        with tempfile.TemporaryDirectory(prefix='mnist-pipeline-') as work_dir:
            pipeline = upload_pipeline(client, compile_pipeline(os.path.join(work_dir, 'mnist_pipeline.yaml')))
    if not actions & {'run', 'schedule'}:
        return 0
    pipeline = pipeline or find_pipeline(client)
    experiment = client.create_experiment(EXPERIMENT_NAME, namespace=namespace)
    run = None
    if 'run' in actions:
        run = start_run(client, experiment.id, pipeline, params)
        print(f'Started run {run.name} in experiment {EXPERIMENT_NAME}: {host}/#/runs/details/{run.id}')
    if 'schedule' in actions:
        schedule_pipeline(client, experiment.id, pipeline, params)
    if run is not None and 'wait' in actions:
        run = wait_for_run(client, run.id, timeout)
        print(f'Run {run.name} finished: {run.status}; {format_run_metrics(run)}')
        if run.status.lower() != 'succeeded':
            return 1
    return 0


def main(argv=None) -> int:
    parser = pipeline_cli.build_parser(
        'Compile the MNIST KFP v1 pipeline (default), run it locally, or upload/run/schedule it on a Kubeflow '
        'Pipelines cluster.', PACKAGE_PATH, 'kfp LocalClient')
    args = parser.parse_args(argv)
    hparams, rule = pipeline_cli.check_arguments(parser, args, PACKAGE_PATH)

    def act():
        if args.run_local:
            return pipeline_cli.run_local_and_report(run_local, args.data, hparams, args.pipeline_root,
                                                     args.serving_dir, rule, args.keep_pipeline_root,
                                                     prefix='mnist-pipeline-')
        if args.upload or args.run or args.schedule:
            return run_cluster_actions(args.host, args.namespace, pipeline_cli.cluster_actions(args),
                                       pipeline_cli.run_parameters(args, hparams, rule), args.timeout)
        print(f'Compiled {compile_pipeline(args.package)}')
        return 0

    return pipeline_cli.report_errors('mnist_pipeline.py', args.host, act)


if __name__ == '__main__':
    sys.exit(main())
