"""Tests for mnist_model/mnist_pipeline.py: the compiled KFP v1 package, a local run, and the cluster actions.

The cluster actions run against a small in-process HTTP server that answers the KFP v1beta1 REST endpoints kfp.Client
calls and records every request, so nothing here needs a network or a cluster.

    python3 -m pytest -q tests/test_pipeline.py
"""
import ast
import contextlib
import csv
import email.parser
import email.policy
import http.server
import importlib
import inspect
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse

import kfp
import numpy as np
import pytest
import yaml

import component_source
import mnist
import mnist_pipeline
import pipeline_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'mnist_model', 'mnist_pipeline.py')
# Each step's function, from its module (load_data.load_data, ..., promote.promote).
STEPS = {name: getattr(importlib.import_module(modules[-1]), modules[-1])
         for name, modules in component_source.STEP_MODULES.items()}
PARAMETER_DEFAULTS = dict(mnist.HYPERPARAMETER_DEFAULTS, data_url=mnist_pipeline.DEFAULT_DATA_URL, serving_pvc='',
                          serving_path='mlops-demo/mnist_model', **mnist.PROMOTION_DEFAULTS)
# Tiny training for the local run: a slice of the data, small layers, a few hundred steps.
SMALL_HPARAMS = {'num_hidden_layer_1': 64, 'num_hidden_layer_2': 32, 'epoch': 200, 'batch_size': 128}
METRIC_NAME = re.compile(r'^[a-zA-Z]([-_a-zA-Z0-9]{0,62}[a-zA-Z0-9])?$')


# ---------------------------------------------------------------------------------------------- compiled package

@pytest.fixture(scope='module')
def workflow(tmp_path_factory):
    path = mnist_pipeline.compile_pipeline(str(tmp_path_factory.mktemp('compiled') / 'mnist_pipeline.yaml'))
    with open(path, encoding='utf-8') as package:
        text = package.read()
    return {'text': text, 'spec': yaml.safe_load(text)}


def _templates(workflow):
    return {template['name']: template for template in workflow['spec']['spec']['templates']}


def test_committed_yaml_regenerates_identically(workflow):
    with open(mnist_pipeline.PACKAGE_PATH, encoding='utf-8') as committed:
        assert committed.read() == workflow['text'], 'run: cd mnist_model && python3 mnist_pipeline.py'
    assert 'pipeline_compilation_time' not in workflow['text']


def test_workflow_names_templates_and_dag(workflow):
    spec = workflow['spec']
    assert spec['apiVersion'] == 'argoproj.io/v1alpha1' and spec['kind'] == 'Workflow'
    pipeline_spec = json.loads(spec['metadata']['annotations']['pipelines.kubeflow.org/pipeline_spec'])
    assert pipeline_spec['name'] == 'mnist-image-classification-pipeline'
    assert pipeline_spec['description'] == 'Pipeline for MNIST Image Classification'
    templates = _templates(workflow)
    assert set(templates) == set(STEPS) | {'mnist-image-classification-pipeline', 'condition-deliver-1'}
    assert spec['spec']['entrypoint'] == 'mnist-image-classification-pipeline'
    tasks = {task['name']: task for task in templates['mnist-image-classification-pipeline']['dag']['tasks']}
    assert {name: sorted(task.get('dependencies', [])) for name, task in tasks.items()} == {
        'load-data': [], 'train': ['load-data'], 'evaluate': ['load-data', 'train'], 'export': ['evaluate', 'train'],
        'condition-deliver-1': ['export', 'load-data']}
    # Data travels as files (artifacts) between the steps; only the hyperparameters are parameters.
    artifacts = {name: {artifact['from'] for artifact in task['arguments'].get('artifacts', [])}
                 for name, task in tasks.items()}
    assert artifacts['train'] == {'{{tasks.load-data.outputs.artifacts.load-data-dataset}}'}
    assert artifacts['evaluate'] == {'{{tasks.load-data.outputs.artifacts.load-data-dataset}}',
                                     '{{tasks.train.outputs.artifacts.train-model}}'}
    assert artifacts['export'] == {'{{tasks.train.outputs.artifacts.train-model}}',
                                   '{{tasks.evaluate.outputs.artifacts.evaluate-metrics}}'}
    # The gate measures on the run's own test split.
    assert artifacts['condition-deliver-1'] == {'{{tasks.export.outputs.artifacts.export-export_dir}}',
                                                '{{tasks.load-data.outputs.artifacts.load-data-dataset}}'}
    train_parameters = {parameter['name'] for parameter in tasks['train']['arguments']['parameters']}
    assert train_parameters == set(mnist.HYPERPARAMETER_DEFAULTS)
    assert tasks['load-data']['arguments']['parameters'] == [{'name': 'data_url',
                                                              'value': '{{inputs.parameters.data_url}}'}]


def test_components_pass_files_not_the_model_in_memory():
    # mnist.run hands evaluate and export the trained model in memory; a component has only its files.
    for component in (mnist_pipeline.evaluate_op, mnist_pipeline.export_op):
        inputs = [spec.name for spec in component.component_spec.inputs]
        assert 'trained_model' not in inputs and 'model' in inputs, inputs


def test_pipeline_parameters_match_the_trainer(workflow):
    arguments = workflow['spec']['spec']['arguments']['parameters']
    parameters = {parameter['name']: parameter['value'] for parameter in arguments}
    assert parameters == {name: str(value) for name, value in PARAMETER_DEFAULTS.items()}
    assert parameters['data_url'] == 'https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz'


def test_promote_runs_only_with_a_claim_and_mounts_the_claim_it_names(workflow):
    templates = _templates(workflow)
    tasks = {task['name']: task for task in templates['mnist-image-classification-pipeline']['dag']['tasks']}
    assert tasks['condition-deliver-1']['when'] == '"{{inputs.parameters.serving_pvc}}" != ""'
    (promote_task,) = templates['condition-deliver-1']['dag']['tasks']
    assert promote_task['template'] == 'promote'
    promote = templates['promote']
    # The claim's name comes from the run's serving_pvc parameter; the folder inside it from serving_path.
    assert promote['volumes'] == [{'name': 'serving',
                                   'persistentVolumeClaim': {'claimName': '{{inputs.parameters.serving_pvc}}'}}]
    assert promote['container']['volumeMounts'] == [{'mountPath': '/mnt/serving', 'name': 'serving'}]
    arguments = promote['container']['args']
    assert arguments[arguments.index('--serving-dir') + 1] == '/mnt/serving/{{inputs.parameters.serving_path}}'
    for name in ('min-accuracy', 'min-improvement', 'force-export'):
        assert arguments[arguments.index(f'--{name}') + 1] == '{{inputs.parameters.%s}}' % name.replace('-', '_')
    outputs = {artifact['name'] for artifact in promote['outputs']['artifacts']}
    assert {'mlpipeline-metrics', 'mlpipeline-ui-metadata', 'promote-promoted', 'promote-model_version'} <= outputs


def test_images_are_pinned_and_nothing_is_installed_at_run_time(workflow):
    for name in STEPS:
        container = _templates(workflow)[name]['container']
        assert container['image'] == mnist_pipeline.BASE_IMAGE == 'tensorflow/tensorflow:2.20.0'
        command = ' '.join(container['command'] + container.get('args', []))
        assert 'pip install' not in command and 'pip3 install' not in command
    assert 'python:3.7' not in workflow['text'] and ':latest' not in workflow['text']
    # kfp 1.8 generates a distutils import for bool parameters; Python 3.12 images have no distutils.
    assert 'distutils' not in workflow['text']


def test_steps_are_never_cached(workflow):
    for name in STEPS:
        annotations = _templates(workflow)[name]['metadata']['annotations']
        assert annotations['pipelines.kubeflow.org/max_cache_staleness'] == 'P0D'


def test_evaluate_emits_the_kfp_v1_metrics_and_ui_metadata_artifacts(workflow):
    artifacts = _templates(workflow)['evaluate']['outputs']['artifacts']
    assert {'mlpipeline-metrics', 'mlpipeline-ui-metadata'} <= {artifact['name'] for artifact in artifacts}


@pytest.mark.parametrize('template_name', sorted(STEPS))
def test_component_embeds_the_step_modules_as_committed(workflow, template_name):
    """The drift check: the program of each component holds its step's module files verbatim, and runs the step
    function of the embedded module, not a copy of it."""
    program = _templates(workflow)[template_name]['container']['command'][-1]
    modules = component_source.embedded_modules(program)
    assert list(modules) == list(component_source.STEP_MODULES[template_name])
    for name, source in modules.items():
        with open(os.path.join(REPO, 'mnist_model', f'{name}.py'), encoding='utf-8') as module_file:
            assert source == module_file.read(), f'{name}.py changed: run python3 mnist_model/mnist_pipeline.py'
    step = STEPS[template_name]
    top_level = ast.parse(program).body
    assert not [node for node in top_level if isinstance(node, ast.FunctionDef) and node.name == step.__name__]
    imports = [node for node in top_level if isinstance(node, ast.ImportFrom) and node.module == step.__name__]
    assert [[alias.name for alias in node.names] for node in imports] == [[step.__name__]]
    assert f'_outputs = {step.__name__}(**_parsed_args)' in program


@pytest.mark.parametrize('template_name', sorted(STEPS))
def test_every_parameter_of_the_step_reaches_it(workflow, template_name):
    """kfp's entry point parses one flag per parameter of the step (but trained_model, the in-memory handover inside
    one process) into its keyword of the same name, and the container passes each of those flags."""
    container = _templates(workflow)[template_name]['container']
    calls = [node for node in ast.walk(ast.parse(container['command'][-1]))
             if isinstance(node, ast.Call) and getattr(node.func, 'attr', None) == 'add_argument']
    parsed = {keyword.value.value for call in calls for keyword in call.keywords if keyword.arg == 'dest'}
    parameters = set(inspect.signature(STEPS[template_name]).parameters) - {'trained_model'}
    assert parsed - {'_output_paths'} == parameters
    passed = json.dumps(container['args'])
    for call in calls:
        assert f'"{call.args[0].value}"' in passed, f'the container never passes {call.args[0].value}'


NO_MATPLOTLIB = r'''
import sys
sys.modules['matplotlib'] = None  # Any import of matplotlib now fails, as in the tensorflow/tensorflow image.
from load_data import load_data
from train import train
data, work = sys.argv[1:]
load_data(data, work + '/dataset.npz')
tiny = dict(num_hidden_layer_1=16, num_hidden_layer_2=16, epoch=20, batch_size=128)
train(work + '/dataset.npz', work + '/model', log_dir='', **tiny)
print('trained without logs')
# The check itself works: with a log folder, train() draws its figures and needs matplotlib.
try:
    train(work + '/dataset.npz', work + '/model-with-logs', log_dir=work + '/logs', **tiny)
except ImportError as error:
    print('with logs:', error)
'''


def test_train_step_runs_in_an_image_without_matplotlib(workflow, small_data_path, tmp_path):
    arguments = _templates(workflow)['train']['container']['args']
    assert arguments[arguments.index('--log-dir') + 1] == '', 'the pipeline writes no TensorBoard logs'
    process = subprocess.run([sys.executable, '-c', NO_MATPLOTLIB, small_data_path, str(tmp_path)],
                             cwd=os.path.join(REPO, 'mnist_model'), capture_output=True, text=True, timeout=180)
    assert process.returncode == 0, process.stderr
    results = [line for line in process.stdout.splitlines() if not line.startswith('step ')]
    assert results == ['trained without logs', 'with logs: import of matplotlib halted; None in sys.modules'], results


# ---------------------------------------------------------------------------------------------------- local run

def run_locally(data, pipeline_root, serving_dir, hparams):
    """mnist_pipeline.py --run-local --serving_dir, in-process (pipeline_root None: its default, a temporary folder);
    returns the exit code and what it printed."""
    argv = ['--run-local', '--data', str(data), '--serving_dir', serving_dir]
    argv += ['--pipeline_root', str(pipeline_root)] if pipeline_root is not None else []
    argv += [f'--{name}={value}' for name, value in hparams.items()]
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        exit_code = mnist_pipeline.main(argv)
    return {'exit_code': exit_code, 'stdout': capture.getvalue(), 'root': str(pipeline_root),
            'serving_dir': serving_dir}


@pytest.fixture(scope='module')
def local_run(small_data_path, tmp_path_factory):
    """A local run that delivers into an empty serving folder."""
    serving_dir = str(tmp_path_factory.mktemp('serving') / 'mnist_model')
    return run_locally(small_data_path, tmp_path_factory.mktemp('kfp-local'), serving_dir, SMALL_HPARAMS)


def _printed_paths(stdout: str) -> dict:
    paths = {}
    for line in stdout.splitlines():
        match = re.match(r'^  (\S+(?: \S+)?)\s{2,}(/\S+)$', line)
        if match:
            paths[match.group(1)] = match.group(2)
    return paths


def test_local_run_succeeds_and_prints_outputs_and_metrics(local_run):
    assert local_run['exit_code'] == 0, local_run['stdout']
    stdout = local_run['stdout']
    assert re.search(r'^Local run mnist-image-classification-pipeline_\d+ succeeded', stdout, re.MULTILINE)
    paths = _printed_paths(stdout)
    assert set(paths) == {'package', 'dataset', 'model', 'metrics', 'mlpipeline_metrics', 'mlpipeline_ui_metadata',
                          'export_dir', 'promote_metrics', 'promote_ui_metadata', 'served version'}
    # The package it ran is the one the demo uploads.
    with open(paths['package'], encoding='utf-8') as package, open(mnist_pipeline.PACKAGE_PATH, encoding='utf-8') as \
            committed:
        assert package.read() == committed.read()
    assert paths.pop('served version') == os.path.join(local_run['serving_dir'], '1')
    for path in paths.values():
        assert path.startswith(local_run['root']) and os.path.exists(path)
    with open(paths['metrics'], encoding='utf-8') as metrics_file:
        metrics = json.load(metrics_file)
    assert metrics['test_examples'] == 1000
    assert 0.5 < metrics['accuracy'] <= 1.0
    assert f'accuracy={metrics["accuracy"]:.6f}' in stdout.splitlines()
    # The trainer's progress lines of the train step are shown, tagged with the step.
    assert any(line.startswith('[train] ') for line in stdout.splitlines())
    # kfp's LocalClient would otherwise leave the mlpipeline outputs in the shared /tmp/outputs.
    assert '/tmp/outputs/' not in stdout


def test_local_run_exports_a_loadable_model_that_scores_what_evaluate_reported(local_run, small_data_path):
    import tensorflow as tf
    paths = _printed_paths(local_run['stdout'])
    assert os.listdir(local_run['serving_dir']) == ['1']
    assert re.search(r'^\[promote\] Promoted: version 1 \(test accuracy 0\.\d{4}\) exported to .*/1, the first '
                     r'version there \(1 000 test images, sha256 [0-9a-f]{8}\)\.$', local_run['stdout'], re.MULTILINE)
    with open(paths['metrics'], encoding='utf-8') as metrics_file:
        metrics = json.load(metrics_file)
    with np.load(small_data_path, allow_pickle=False) as data:
        images, labels = data['x_test'], data['y_test']
    serving = tf.saved_model.load(paths['served version']).signatures['serving_default']
    outputs = serving(pixels=tf.constant(images.reshape(-1, 784).astype('float32')))
    accuracy = float(np.mean(outputs['digit'].numpy() == labels))
    assert accuracy == pytest.approx(metrics['accuracy'], abs=0.002)
    assert np.allclose(outputs['probabilities'].numpy().sum(axis=1), 1.0, atol=1e-4)


def test_local_run_metrics_follow_the_kfp_v1_schemas(local_run):
    paths = _printed_paths(local_run['stdout'])
    with open(paths['metrics'], encoding='utf-8') as metrics_file:
        metrics = json.load(metrics_file)
    with open(paths['mlpipeline_metrics'], encoding='utf-8') as kfp_metrics_file:
        kfp_metrics = json.load(kfp_metrics_file)
    assert set(kfp_metrics) == {'metrics'}
    by_name = {metric['name']: metric for metric in kfp_metrics['metrics']}
    assert set(by_name) == {'accuracy', 'loss'}
    for metric in kfp_metrics['metrics']:
        assert METRIC_NAME.match(metric['name'])
        assert isinstance(metric['numberValue'], (int, float)) and metric['format'] in ('RAW', 'PERCENTAGE')
    assert by_name['accuracy']['format'] == 'PERCENTAGE'
    assert by_name['accuracy']['numberValue'] == pytest.approx(100 * metrics['accuracy'], abs=1e-4)
    assert by_name['loss']['numberValue'] == pytest.approx(metrics['loss'], rel=1e-4)

    with open(paths['mlpipeline_ui_metadata'], encoding='utf-8') as ui_file:
        ui_metadata = json.load(ui_file)
    viewers = {output['type']: output for output in ui_metadata['outputs']}
    assert set(viewers) == {'confusion_matrix', 'markdown'}
    matrix = viewers['confusion_matrix']
    assert matrix['format'] == 'csv' and matrix['storage'] == 'inline'
    assert [column['name'] for column in matrix['schema']] == ['target', 'predicted', 'count']
    assert matrix['labels'] == [str(digit) for digit in range(10)]
    rows = list(csv.reader(io.StringIO(matrix['source'])))
    assert len(rows) == 100
    counts = {(target, predicted): int(count) for target, predicted, count in rows}
    assert sum(counts.values()) == metrics['test_examples']
    correct = sum(counts[str(digit), str(digit)] for digit in range(10))
    assert correct / metrics['test_examples'] == pytest.approx(metrics['accuracy'], abs=1e-6)
    markdown = viewers['markdown']
    assert markdown['storage'] == 'inline' and markdown['source'].strip()


def test_a_run_in_a_temporary_folder_leaves_nothing_there(small_data_path, tmp_path, monkeypatch):
    # Without --pipeline_root the run's outputs, kfp's `mktemp` program files and TensorFlow's generated code go to a
    # new temporary folder: a fresh one here, which must be empty again after a run that fails in its first step.
    # (A worse model declined by the v1 pipeline's promote step: tests/test_run_demo.py, the demo's pipeline stage.)
    temporary = tmp_path / 'tmp'
    temporary.mkdir()
    monkeypatch.setenv('TMPDIR', str(temporary))
    monkeypatch.setattr(tempfile, 'tempdir', str(temporary))
    failed = run_locally(tmp_path / 'missing.npz', None, str(tmp_path / 'serving'), SMALL_HPARAMS)
    assert failed['exit_code'] == 1 and os.listdir(temporary) == []


def test_a_successful_run_in_a_temporary_folder_says_it_was_removed(tmp_path, monkeypatch, capsys):
    # What run_local_and_report prints and removes around a successful run (the step processes are
    # test_local_run_succeeds_and_prints_outputs_and_metrics's; here run_local only writes an output).
    temporary = tmp_path / 'tmp'
    temporary.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(temporary))

    def run_local(data, hparams, pipeline_root, serving_dir, rule):
        with open(os.path.join(pipeline_root, 'output'), 'w') as output:
            output.write('x')
        return {'run_id': 'run-1', 'outputs': {'model': os.path.join(pipeline_root, 'output')}, 'accuracy': 0.91,
                'loss': 0.3, 'model_version': 2}

    assert pipeline_cli.run_local_and_report(run_local, 'data.npz', {}, None, str(tmp_path / 'serving'), {},
                                             keep_pipeline_root=False, prefix='mnist-pipeline-') == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf'Outputs were in the temporary folder {re.escape(str(temporary))}/mnist-pipeline-\w+, '
                        r'removed now \(--keep_pipeline_root keeps it\)\.', lines[1])
    assert lines[2] == f'Served as {tmp_path / "serving" / "2"}.' and lines[3:] == ['accuracy=0.910000',
                                                                                  'loss=0.300000']
    assert os.listdir(temporary) == []


def test_the_promote_step_reports_its_decision_as_metrics(local_run):
    with open(_printed_paths(local_run['stdout'])['promote_metrics'], encoding='utf-8') as metrics_file:
        metrics = {metric['name']: metric['numberValue'] for metric in json.load(metrics_file)['metrics']}
    # The first version: no served one to measure against, only the candidate's measured accuracy.
    assert set(metrics) == {'promoted', 'model-version', 'candidate-accuracy'}
    assert (metrics['promoted'], metrics['model-version']) == (1, 1) and 0.5 < metrics['candidate-accuracy'] <= 1
    for name in metrics:
        assert METRIC_NAME.match(name)


def test_local_run_failure_is_one_clear_line(tmp_path, capsys):
    exit_code = mnist_pipeline.main(['--run-local', '--data', str(tmp_path / 'missing.npz'),
                                     '--pipeline_root', str(tmp_path / 'root')])
    assert exit_code == 1
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1
    assert error_lines[0].startswith('mnist_pipeline.py: error: step load-data failed: ')
    assert 'missing.npz' in error_lines[0]


# ------------------------------------------------------------------------------------------- fake KFP API server

class FakeKfp:
    """The part of the KFP v1beta1 REST API that kfp.Client uses for upload, run and schedule, kept in memory.

    Lists return at most PAGE_SIZE items per page so the client's paging is exercised too.
    """
    PAGE_SIZE = 2

    def __init__(self, cookie=None, token=None, login_redirect=False, run_statuses=('Running', 'Succeeded'),
                 multi_user=False, errors=None):
        self.cookie, self.token, self.login_redirect = cookie, token, login_redirect
        self.multi_user = multi_user
        self.errors = errors or {}  # (method, path) -> (status, answer) for requests that must fail
        self.run_statuses = list(run_statuses)
        self.requests = []
        self.pipelines, self.versions, self.experiments, self.runs, self.jobs = [], [], [], [], []
        self.next_id = 0

    def new_id(self, kind):
        self.next_id += 1
        return f'{kind}-{self.next_id}'

    def authorized(self, headers):
        if self.cookie is None and self.token is None:
            return True
        return ((self.cookie is not None and headers.get('Cookie') == self.cookie) or
                (self.token is not None and headers.get('Authorization') == f'Bearer {self.token}'))

    def page(self, items, key, query):
        start = int(query.get('page_token') or 0)
        answer = {key: items[start:start + self.PAGE_SIZE], 'total_size': len(items)} if items else {}
        if start + self.PAGE_SIZE < len(items):
            answer['next_page_token'] = str(start + self.PAGE_SIZE)
        return answer

    @staticmethod
    def name_filter(query):
        if not query.get('filter'):
            return None
        predicates = json.loads(query['filter'])['predicates']
        return next(predicate['stringValue'] for predicate in predicates if predicate['key'] == 'name')

    def handle(self, method, path, query, body):
        """Returns (status, JSON answer)."""
        api = '/apis/v1beta1/'
        if (method, path) in self.errors:
            return self.errors[method, path]
        if method == 'GET' and path == api + 'healthz':
            return 200, {'multi_user': self.multi_user, 'commit_sha': 'fake', 'tag_name': '1.8.5'}
        if method == 'GET' and path == api + 'pipelines':
            name = self.name_filter(query)
            return 200, self.page([p for p in self.pipelines if name in (None, p['name'])], 'pipelines', query)
        if method == 'POST' and path == api + 'pipelines/upload':
            pipeline_id = self.new_id('pipeline')
            version = {'id': pipeline_id, 'name': query['name']}
            pipeline = {'id': pipeline_id, 'name': query['name'], 'description': query.get('description'),
                        'default_version': version}
            self.pipelines.append(pipeline)
            self.versions.append(dict(version, pipeline_id=pipeline_id))
            return 200, pipeline
        if method == 'POST' and path == api + 'pipelines/upload_version':
            pipeline_id = query['pipelineid']
            if any(v['pipeline_id'] == pipeline_id and v['name'] == query['name'] for v in self.versions):
                return 409, {'error': 'The name ' + query['name'] + ' already exist', 'code': 6}
            version = {'id': self.new_id('version'), 'name': query['name'], 'description': query.get('description')}
            self.versions.append(dict(version, pipeline_id=pipeline_id))
            # The default version stays (a KFP server setting decides whether uploads move it).
            return 200, version
        if method == 'GET' and path == api + 'pipeline_versions':
            versions = [{'id': v['id'], 'name': v['name']} for v in self.versions
                        if v['pipeline_id'] == query.get('resource_key.id')]
            if query.get('sort_by') == 'created_at desc':
                versions.reverse()
            return 200, self.page(versions, 'versions', query)
        if method == 'GET' and path == api + 'experiments':
            name = self.name_filter(query)
            return 200, self.page([e for e in self.experiments if name in (None, e['name'])], 'experiments', query)
        if method == 'POST' and path == api + 'experiments':
            experiment = dict(body, id=self.new_id('experiment'))
            self.experiments.append(experiment)
            return 200, experiment
        if method == 'POST' and path == api + 'runs':
            run = dict(body, id=self.new_id('run'), status='')
            self.runs.append(run)
            return 200, {'run': run}
        if method == 'GET' and path.startswith(api + 'runs/'):
            run = next(run for run in self.runs if run['id'] == path.rsplit('/', 1)[1])
            run['status'] = self.run_statuses.pop(0) if self.run_statuses else run['status']
            if run['status'] == 'Succeeded':
                run['metrics'] = [{'name': 'accuracy', 'node_id': 'evaluate', 'number_value': 98.12,
                                   'format': 'PERCENTAGE'},
                                  {'name': 'loss', 'node_id': 'evaluate', 'number_value': 0.0634, 'format': 'RAW'}]
            return 200, {'run': run}
        if method == 'GET' and path == api + 'jobs':
            experiment_id = query.get('resource_reference_key.id')
            jobs = [job for job in self.jobs
                    if experiment_id is None or job['resource_references'][0]['key']['id'] == experiment_id]
            return 200, self.page(jobs, 'jobs', query)
        if method == 'POST' and path == api + 'jobs':
            job = dict(body, id=self.new_id('job'))
            self.jobs.append(job)
            return 200, job
        return 404, {'error': f'no route {method} {path}', 'code': 5}

    def requests_to(self, method, path):
        return [request for request in self.requests
                if request['method'] == method and request['path'] == '/apis/v1beta1/' + path]


def _make_handler(fake):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _serve(self, method):
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            raw = self.rfile.read(int(self.headers.get('Content-Length') or 0))
            body = None
            if self.headers.get_content_type() == 'multipart/form-data':
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b'Content-Type: ' + self.headers['Content-Type'].encode() + b'\r\n\r\n' + raw)
                body = {part.get_param('name', header='content-disposition'): part.get_payload(decode=True)
                        for part in message.iter_parts()}
            elif raw:
                body = json.loads(raw)
            fake.requests.append({'method': method, 'path': url.path, 'query': query, 'body': body,
                                  'cookie': self.headers.get('Cookie'),
                                  'authorization': self.headers.get('Authorization')})
            if not fake.authorized(self.headers):
                if fake.login_redirect:
                    self.send_response(302)
                    self.send_header('Location', '/dex/auth?client_id=kubeflow-oidc-authservice')
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                status, answer = 401, {'error': 'Unauthorized', 'code': 16}
            else:
                status, answer = fake.handle(method, url.path, query, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve('GET')

        def do_POST(self):
            self._serve('POST')

    return Handler


@pytest.fixture
def kfp_server(monkeypatch, tmp_path):
    """Starts fake KFP API servers on free local ports: kfp_server(**FakeKfp options) -> (fake, url)."""
    # Keep kfp.Client away from the user's ~/.config/kfp/context.json and the auth variables of the environment.
    monkeypatch.setattr(kfp.Client, 'LOCAL_KFP_CONTEXT', str(tmp_path / 'kfp-context.json'))
    monkeypatch.setattr(mnist_pipeline, 'TOKEN_FILE', str(tmp_path / 'no-token'))
    monkeypatch.setattr(mnist_pipeline, 'POLL_SECONDS', 0.01)
    for name in ('KF_PIPELINES_COOKIE', 'KF_PIPELINES_TOKEN', 'KF_PIPELINES_ENDPOINT', 'KF_PIPELINES_UI_ENDPOINT'):
        monkeypatch.delenv(name, raising=False)
    servers = []

    def start(**options):
        fake = FakeKfp(**options)
        server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _make_handler(fake))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return fake, f'http://127.0.0.1:{server.server_address[1]}'

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _expected_parameters(**overrides):
    return [{'name': name, 'value': str(value)} for name, value in dict(PARAMETER_DEFAULTS, **overrides).items()]


def _reference(references, kind):
    return next(reference for reference in references if reference['key']['type'] == kind)


def test_upload_run_and_schedule_on_a_fresh_cluster(kfp_server, capsys):
    fake, url = kfp_server()
    assert mnist_pipeline.main(['--host', url, '--upload', '--run', '--schedule', '--epoch=1500']) == 0
    stdout = capsys.readouterr().out

    uploads = fake.requests_to('POST', 'pipelines/upload')
    assert len(uploads) == 1
    assert uploads[0]['query'] == {'name': 'mnist-image-classification-pipeline',
                                   'description': 'Pipeline for MNIST Image Classification'}
    with open(mnist_pipeline.PACKAGE_PATH, 'rb') as committed:
        assert uploads[0]['body']['uploadfile'] == committed.read()
    assert not fake.requests_to('POST', 'pipelines/upload_version')

    assert [request['body']['name'] for request in fake.requests_to('POST', 'experiments')] == ['MNIST']
    experiment_id = fake.experiments[0]['id']
    pipeline = fake.pipelines[0]

    (run,) = [request['body'] for request in fake.requests_to('POST', 'runs')]
    assert run['name'].startswith('mnist-image-classification-pipeline-')
    assert run['pipeline_spec']['pipeline_id'] == pipeline['id']
    assert run['pipeline_spec']['parameters'] == _expected_parameters(epoch=1500)
    references = run['resource_references']
    assert _reference(references, 'EXPERIMENT') == {'key': {'type': 'EXPERIMENT', 'id': experiment_id},
                                                    'relationship': 'OWNER'}
    assert _reference(references, 'PIPELINE_VERSION')['key']['id'] == pipeline['default_version']['id']
    assert f'{url}/#/runs/details/{fake.runs[0]["id"]}' in stdout

    (job,) = [request['body'] for request in fake.requests_to('POST', 'jobs')]
    assert job['name'] == 'mnist-pipeline-schedule'
    assert job['description'] == 'MNIST Image Classification Model Workflow. 1 Weeks'
    assert int(job['trigger']['periodic_schedule']['interval_second']) == 604800
    assert 'cron_schedule' not in job['trigger']
    assert int(job['max_concurrency']) == 1
    assert job['no_catchup'] is True and job['enabled'] is True
    assert job['pipeline_spec']['parameters'] == _expected_parameters(epoch=1500)
    assert _reference(job['resource_references'], 'EXPERIMENT')['key']['id'] == experiment_id


def test_second_upload_adds_versions_and_schedule_is_idempotent(kfp_server, capsys):
    fake, url = kfp_server()
    assert mnist_pipeline.main(['--host', url, '--upload', '--schedule']) == 0
    assert mnist_pipeline.main(['--host', url, '--upload', '--schedule']) == 0
    assert mnist_pipeline.main(['--host', url, '--upload']) == 0
    capsys.readouterr()
    assert len(fake.requests_to('POST', 'pipelines/upload')) == 1
    versions = fake.requests_to('POST', 'pipelines/upload_version')
    assert [request['query']['name'] for request in versions] == ['mnist-template', 'mnist-template-2']
    assert {request['query']['description'] for request in versions} == {'mnist pipeline template'}
    assert {request['query']['pipelineid'] for request in versions} == {fake.pipelines[0]['id']}
    # The experiment is reused and the second --schedule finds the recurring run instead of adding one.
    assert len(fake.requests_to('POST', 'experiments')) == 1
    assert len(fake.requests_to('POST', 'jobs')) == 1

    # With more recurring runs than fit on one page the existing one is still found.
    fake.jobs[0:0] = [dict(fake.jobs[0], id=f'other-{number}', name=f'other-{number}') for number in range(3)]
    assert mnist_pipeline.main(['--host', url, '--schedule']) == 0
    assert len(fake.requests_to('POST', 'jobs')) == 1
    assert 'already exists' in capsys.readouterr().out


def test_run_uses_the_newest_version_and_wait_prints_status_and_metrics(kfp_server, capsys):
    fake, url = kfp_server()
    assert mnist_pipeline.main(['--host', url, '--upload']) == 0
    assert mnist_pipeline.main(['--host', url, '--upload']) == 0
    assert mnist_pipeline.main(['--host', url, '--run', '--wait', '--dropout=0.5']) == 0
    stdout = capsys.readouterr().out
    (run,) = [request['body'] for request in fake.requests_to('POST', 'runs')]
    newest = fake.versions[-1]
    assert newest['name'] == 'mnist-template'
    assert _reference(run['resource_references'], 'PIPELINE_VERSION')['key']['id'] == newest['id']
    assert run['pipeline_spec']['parameters'] == _expected_parameters(dropout=0.5)
    assert len(fake.requests_to('GET', f'runs/{fake.runs[0]["id"]}')) == 2
    assert re.search(r'finished: Succeeded; accuracy 98\.12 % \| loss 0\.0634', stdout)


def test_failed_run_with_wait_exits_1(kfp_server, capsys):
    fake, url = kfp_server(run_statuses=('Failed',))
    assert mnist_pipeline.main(['--host', url, '--upload']) == 0
    assert mnist_pipeline.main(['--host', url, '--run', '--wait']) == 1
    assert 'finished: Failed' in capsys.readouterr().out


def test_multi_user_kubeflow_needs_a_namespace(kfp_server, capsys):
    fake, url = kfp_server(multi_user=True)
    # Pipelines are shared by all users; experiments, runs and schedules belong to a profile namespace.
    assert mnist_pipeline.main(['--host', url, '--upload']) == 0
    assert mnist_pipeline.main(['--host', url, '--run', '--schedule']) == 1
    assert 'multi-user Kubeflow: give --namespace' in capsys.readouterr().err
    assert not fake.requests_to('POST', 'experiments') and not fake.requests_to('POST', 'runs')


def test_run_and_schedule_deliver_to_the_claim_given(kfp_server, capsys):
    fake, url = kfp_server()
    assert mnist_pipeline.main(['--host', url, '--upload', '--run', '--schedule', '--serving_pvc', 'workspace-mnist',
                                '--min_accuracy', '0.97', '--min_improvement', '0.001']) == 0
    expected = _expected_parameters(serving_pvc='workspace-mnist', min_accuracy=0.97, min_improvement=0.001)
    (run,) = [request['body'] for request in fake.requests_to('POST', 'runs')]
    (job,) = [request['body'] for request in fake.requests_to('POST', 'jobs')]
    assert run['pipeline_spec']['parameters'] == job['pipeline_spec']['parameters'] == expected


def test_namespace_goes_to_the_experiment(kfp_server, capsys):
    fake, url = kfp_server(multi_user=True)
    assert mnist_pipeline.main(['--host', url, '--namespace', 'kubeflow-user-example-com', '--upload', '--run']) == 0
    (experiment,) = [request['body'] for request in fake.requests_to('POST', 'experiments')]
    assert experiment['resource_references'] == [
        {'key': {'type': 'NAMESPACE', 'id': 'kubeflow-user-example-com'}, 'relationship': 'OWNER'}]
    lookups = fake.requests_to('GET', 'experiments')
    assert lookups and all(request['query']['resource_reference_key.id'] == 'kubeflow-user-example-com'
                           for request in lookups)


def test_missing_pipeline_is_one_clear_line(kfp_server, capsys):
    fake, url = kfp_server()
    assert mnist_pipeline.main(['--host', url, '--run']) == 1
    error = capsys.readouterr().err.strip()
    assert error == ('mnist_pipeline.py: error: pipeline mnist-image-classification-pipeline not found: '
                     'upload it first with --upload')
    assert not fake.requests_to('POST', 'runs')


@pytest.mark.parametrize('login_redirect', [False, True])
def test_refused_auth_is_one_clear_line(kfp_server, capsys, login_redirect):
    fake, url = kfp_server(cookie='authservice_session=secret', login_redirect=login_redirect)
    assert mnist_pipeline.main(['--host', url, '--upload']) == 1
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1 and 'KF_PIPELINES_COOKIE' in error_lines[0]
    assert ('login page' in error_lines[0]) == login_redirect
    assert not fake.requests_to('POST', 'pipelines/upload')


def test_session_cookie_and_bearer_token_are_sent(kfp_server, capsys, monkeypatch):
    fake, url = kfp_server(cookie='authservice_session=secret')
    monkeypatch.setenv('KF_PIPELINES_COOKIE', 'authservice_session=secret')
    assert mnist_pipeline.main(['--host', url, '--upload']) == 0
    assert {request['cookie'] for request in fake.requests} == {'authservice_session=secret'}

    fake, url = kfp_server(token='abc.def')
    monkeypatch.delenv('KF_PIPELINES_COOKIE')
    monkeypatch.setenv('KF_PIPELINES_TOKEN', 'abc.def')
    assert mnist_pipeline.main(['--host', url, '--upload', '--schedule']) == 0
    assert {request['authorization'] for request in fake.requests} == {'Bearer abc.def'}
    assert len(fake.requests_to('POST', 'jobs')) == 1


@pytest.mark.parametrize('status, expected', [
    (400, 'Kubeflow Pipelines API error (HTTP 400): Invalid input error: unknown parameter'),
    (403, 'Kubeflow Pipelines refused the request (HTTP 403): Invalid input error: unknown parameter; check '),
])
def test_api_errors_are_one_clear_line(kfp_server, capsys, status, expected):
    fake, url = kfp_server(errors={('POST', '/apis/v1beta1/runs'): (
        status, {'error': 'Invalid input error: unknown parameter', 'code': 3})})
    assert mnist_pipeline.main(['--host', url, '--upload']) == 0
    assert mnist_pipeline.main(['--host', url, '--run']) == 1
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith('mnist_pipeline.py: error: ' + expected)


def test_unreachable_host_is_one_clear_line_from_the_command_line():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        closed_port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, SCRIPT, '--host', f'http://127.0.0.1:{closed_port}', '--run'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f'mnist_pipeline.py: error: cannot reach Kubeflow Pipelines at '
                                                  f'http://127.0.0.1:{closed_port}: [Errno 111] Connection refused']


def test_wrong_url_is_one_clear_line(kfp_server, capsys):
    fake, url = kfp_server()
    assert mnist_pipeline.main(['--host', url + '/not-kfp', '--upload']) == 1
    assert 'is not a Kubeflow Pipelines API endpoint (HTTP 404' in capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['--upload'], '--upload, --run and --schedule need --host'),
    (['--host', 'http://localhost:8080'], '--host needs at least one of --upload, --run, --schedule'),
    (['--host', 'localhost:8080', '--run'], 'expected an http:// or https:// URL'),
    (['--host', 'http://localhost:8080', '--upload', '--wait'], '--wait needs --run'),
    (['--run-local', '--host', 'http://localhost:8080', '--run'], '--run-local and --host cannot be combined'),
    (['--host', 'http://localhost:8080', '--run', '--wait', '--timeout', '0'], 'expected a number of seconds > 0'),
    (['--host', 'http://localhost:8080', '--run', '--dropout=0'], 'must be a keep probability in (0, 1]'),
    (['--epoch=100'], 'hyperparameters are for --run-local, --run and --schedule'),
    (['--host', 'http://localhost:8080', '--upload', '--epoch=100'], 'hyperparameters are for --run-local'),
    (['--host', 'http://localhost:8080', '--run', '--data', 'x.npz'], '--data is for --run-local'),
    (['--run-local', '--data_url', 'http://mirror/mnist.npz'], '--data_url is for --run and --schedule'),
    (['--pipeline_root', '/tmp/x'], '--pipeline_root is for --run-local'),
    (['--keep_pipeline_root'], '--keep_pipeline_root is for --run-local without --pipeline_root'),
    (['--run-local', '--pipeline_root', '/tmp/x', '--keep_pipeline_root'], '--keep_pipeline_root is for --run-local'),
    (['--serving_dir', '/tmp/x'], '--serving_dir is for --run-local'),
    (['--run-local', '--serving_pvc', 'claim'], '--serving_pvc and --serving_path are for --run and --schedule'),
    (['--host', 'http://localhost:8080', '--run', '--serving_path', 'x'], '--serving_path needs --serving_pvc'),
    (['--run-local', '--min_accuracy', '0.9'], 'apply to a delivery: give --serving_dir'),
    (['--host', 'http://localhost:8080', '--run', '--force_export'], 'apply to a delivery: give --serving_dir'),
    (['--run-local', '--serving_dir', 'x', '--min_accuracy', '2'], 'must be a test accuracy in [0, 1]'),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist_pipeline.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unique_version_name():
    assert mnist_pipeline.unique_version_name('mnist-template', ['mnist-image-classification-pipeline']) == \
        'mnist-template'
    assert mnist_pipeline.unique_version_name('mnist-template', ['mnist-template', 'mnist-template-2']) == \
        'mnist-template-3'
