"""Tests for mnist_model/mnist_pipeline_v2.py: the compiled KFP v2 IR, a local kfp.local run, and the cluster actions.

The tests run in the main environment (kfp 1.8); the v2 script runs as a subprocess with the python of the second
environment (requirements-kfp2.txt), found through $MNIST_KFP2_PYTHON or .ci/run's ~/.cache/mnist-demo-venv-kfp2.
Without it the tests skip with the reason, and fail in CI (CI=true). The cluster actions run the real kfp 2 Client
against a small in-process HTTP server that answers the KFP v2beta1 REST endpoints and records every request.

    MNIST_KFP2_PYTHON=~/.cache/mnist-demo-venv-kfp2/bin/python python3 -m pytest -q tests/test_pipeline_v2.py
"""
import ast
import http.server
import inspect
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml

import component_source
import mnist
import pipeline_cli
from test_pipeline import STEPS, _make_handler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'mnist_model', 'mnist_pipeline_v2.py')
PACKAGE_PATH = os.path.join(REPO, 'mnist_model', 'mnist_pipeline_v2.yaml')
IMAGE = 'registry.example.com/team/mnist-pipeline-kfp2:1.0.0'
PARAMETER_DEFAULTS = dict(mnist.HYPERPARAMETER_DEFAULTS, data_url=pipeline_cli.DEFAULT_DATA_URL, serving_pvc='',
                          serving_path='mlops-demo/mnist_model', **mnist.PROMOTION_DEFAULTS)
SMALL_HPARAMS = {'num_hidden_layer_1': 64, 'num_hidden_layer_2': 32, 'epoch': 200, 'batch_size': 128}


@pytest.fixture(scope='module')
def kfp2_python():
    python = pipeline_cli.find_kfp2_python()
    if python is None:
        reason = ('the kfp 2 environment is missing: set MNIST_KFP2_PYTHON to its python, or let .ci/run build '
                  '~/.cache/mnist-demo-venv-kfp2 from requirements-kfp2.txt')
        if os.environ.get('CI') == 'true':
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def run_v2(python, *args, env=None, timeout=600):
    """mnist_pipeline_v2.py with the kfp 2 environment's python, from the repository's top folder."""
    return subprocess.run([python, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', **(env or {})})


# ---------------------------------------------------------------------------------------------------- compiled IR

@pytest.fixture(scope='module')
def ir(kfp2_python, tmp_path_factory):
    path = tmp_path_factory.mktemp('compiled') / 'mnist_pipeline_v2.yaml'
    process = run_v2(kfp2_python, '--package', str(path))
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == f'Compiled {path}'
    text = path.read_text(encoding='utf-8')
    pipeline_spec, platform_spec = yaml.safe_load_all(text)
    return {'text': text, 'spec': pipeline_spec, 'platform': platform_spec}


def test_committed_ir_regenerates_identically(ir):
    with open(PACKAGE_PATH, encoding='utf-8') as committed:
        assert committed.read() == ir['text'], 'run: python3 mnist_model/mnist_pipeline_v2.py (kfp 2 environment)'


def test_ir_has_the_five_steps_in_order(ir):
    spec = ir['spec']
    assert spec['pipelineInfo']['name'] == 'mnist-image-classification-pipeline'
    assert spec['pipelineInfo']['description'] == 'Pipeline for MNIST Image Classification'
    assert spec['sdkVersion'] == 'kfp-2.17.3' and spec['schemaVersion'] == '2.1.0'
    root_tasks = spec['root']['dag']['tasks']
    assert {name: sorted(task.get('dependentTasks', [])) for name, task in root_tasks.items()} == {
        'load-data': [], 'train': ['load-data'], 'evaluate': ['load-data', 'train'], 'export': ['evaluate', 'train'],
        'condition-1': ['export', 'load-data']}
    (promote_task,) = spec['components']['comp-condition-1']['dag']['tasks'].values()
    assert promote_task['componentRef']['name'] == 'comp-promote'
    # Data travels as artifacts between the steps; only values are parameters.
    assert root_tasks['train']['inputs']['artifacts'] == {
        'dataset': {'taskOutputArtifact': {'outputArtifactKey': 'dataset', 'producerTask': 'load-data'}}}
    assert root_tasks['export']['inputs']['artifacts'] == {
        'evaluation': {'taskOutputArtifact': {'outputArtifactKey': 'evaluation', 'producerTask': 'evaluate'}},
        'model': {'taskOutputArtifact': {'outputArtifactKey': 'model', 'producerTask': 'train'}}}
    assert set(root_tasks['train']['inputs']['parameters']) == set(mnist.HYPERPARAMETER_DEFAULTS)


def test_pipeline_parameters_match_the_trainer(ir):
    parameters = ir['spec']['root']['inputDefinitions']['parameters']
    assert {name: parameter['defaultValue'] for name, parameter in parameters.items()} == PARAMETER_DEFAULTS
    assert {name: parameter['parameterType'] for name, parameter in parameters.items()} == {
        'num_hidden_layer_1': 'NUMBER_INTEGER', 'num_hidden_layer_2': 'NUMBER_INTEGER', 'dropout': 'NUMBER_DOUBLE',
        'learning_rate': 'NUMBER_DOUBLE', 'epoch': 'NUMBER_INTEGER', 'batch_size': 'NUMBER_INTEGER',
        'seed': 'NUMBER_INTEGER', 'data_url': 'STRING', 'serving_pvc': 'STRING', 'serving_path': 'STRING',
        'min_accuracy': 'NUMBER_DOUBLE', 'min_improvement': 'NUMBER_DOUBLE', 'max_digit_drop': 'NUMBER_DOUBLE',
        'min_test_examples': 'NUMBER_INTEGER', 'force_export': 'BOOLEAN'}


def test_promote_runs_only_with_a_claim_and_mounts_the_claim_it_names(ir):
    condition = ir['spec']['root']['dag']['tasks']['condition-1']
    assert condition['taskInfo']['name'] == 'deliver'
    assert condition['triggerPolicy']['condition'] == "inputs.parameter_values['pipelinechannel--serving_pvc'] != ''"
    (promote_task,) = ir['spec']['components']['comp-condition-1']['dag']['tasks'].values()
    assert promote_task['inputs']['parameters']['serving_dir'] == {'runtimeValue': {
        'constant': "/mnt/serving/{{$.inputs.parameters['pipelinechannel--serving_path']}}"}}
    # The claim's name is the run's serving_pvc parameter, mounted only into the promote step.
    executors = ir['platform']['platforms']['kubernetes']['deploymentSpec']['executors']
    assert executors == {'exec-promote': {'pvcMount': [{
        'componentInputParameter': 'pipelinechannel--serving_pvc', 'mountPath': '/mnt/serving',
        'pvcNameParameter': {'componentInputParameter': 'pipelinechannel--serving_pvc'}}]}}


def test_run_page_outputs_are_v2_metrics_artifacts(ir):
    components = ir['spec']['components']

    def outputs(component):
        definitions = components[component]['outputDefinitions']
        return ({name: output['artifactType']['schemaTitle'] for name, output in definitions['artifacts'].items()},
                {name: output['parameterType'] for name, output in definitions.get('parameters', {}).items()})

    assert outputs('comp-evaluate') == ({'evaluation': 'system.Artifact', 'metrics': 'system.Metrics',
                                         'confusion_matrix': 'system.ClassificationMetrics'},
                                        {'accuracy': 'NUMBER_DOUBLE', 'loss': 'NUMBER_DOUBLE'})
    assert outputs('comp-promote') == ({'metrics': 'system.Metrics'}, {
        'promoted': 'BOOLEAN', 'model_version': 'NUMBER_INTEGER', 'decision': 'STRING'})
    assert outputs('comp-train') == ({'model': 'system.Model'}, {})
    assert outputs('comp-export') == ({'export_dir': 'system.Model'}, {})


def test_our_pinned_image_and_nothing_is_installed_at_run_time(ir):
    executors = ir['spec']['deploymentSpec']['executors']
    assert set(executors) == {f'exec-{name}' for name in STEPS}
    for executor in executors.values():
        container = executor['container']
        assert container['image'] == '<registry>/mnist-pipeline-kfp2:1.0.0'
        command = ' '.join(container['command'] + container['args'])
        assert 'pip install' not in command and 'pip3 install' not in command
        assert container['command'][:2] == ['sh', '-ec'] and 'python3 -m kfp.dsl.executor_main' in command
    assert ':latest' not in ir['text'] and 'python:3' not in ir['text']


def test_steps_are_never_cached(ir):
    tasks = dict(ir['spec']['root']['dag']['tasks'], **ir['spec']['components']['comp-condition-1']['dag']['tasks'])
    step_tasks = {name: task for name, task in tasks.items() if not name.startswith('condition-')}
    assert set(step_tasks) == set(STEPS)
    # kfp writes enableCache: true for a cached task; an empty cachingOptions is caching off.
    assert all(task['cachingOptions'] == {} for task in step_tasks.values())


def _functions(source: str) -> dict:
    return {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}


def _argument_defaults(function: ast.FunctionDef) -> dict:
    arguments = function.args.args
    defaults = [None] * (len(arguments) - len(function.args.defaults)) + function.args.defaults
    return {argument.arg: ast.literal_eval(default) if default else inspect.Parameter.empty
            for argument, default in zip(arguments, defaults)}


# How an adapter names a step's file parameters: its artifact of the same role. The step's KFP v1 run-page files
# are written beside the adapter's outputs, not passed in.
ARTIFACT_NAMES = {'dataset_path': 'dataset', 'model_path': 'model', 'metrics_path': 'evaluation',
                  'export_dir': 'export_dir'}
V1_RUN_PAGE_FILES = {'mlpipeline_metrics_path', 'mlpipeline_ui_metadata_path'}
V2_RUN_PAGE_OUTPUTS = {'metrics', 'confusion_matrix'}


@pytest.mark.parametrize('name', sorted(STEPS))
def test_component_runs_the_step_function_through_a_thin_adapter(ir, name):
    """The drift check: each component embeds its step's module files verbatim, and an adapter with the step's own
    parameters and defaults, its files as artifacts, that imports the step from its module and calls it once."""
    step = STEPS[name]
    source = ir['spec']['deploymentSpec']['executors'][f'exec-{name}']['container']['command'][-1]
    modules = component_source.embedded_modules(source)
    assert list(modules) == list(component_source.STEP_MODULES[name])
    for module_name, module_text in modules.items():
        with open(os.path.join(REPO, 'mnist_model', f'{module_name}.py'), encoding='utf-8') as module_file:
            assert module_text == module_file.read(), f'{module_name}.py changed: run mnist_pipeline_v2.py'
    embedded = _functions(modules[step.__name__])[step.__name__]
    functions = {function_name: function for function_name, function in _functions(source).items()
                 if function_name != component_source.DEFINE_MODULE}
    (adapter_name, adapter), = functions.items()
    assert adapter_name == f'{step.__name__}_step'
    args = ir['spec']['deploymentSpec']['executors'][f'exec-{name}']['container']['args']
    assert args[args.index('--function_to_execute') + 1] == adapter_name

    # trained_model is mnist.py's in-memory handover inside one process; components pass files instead (as in v1).
    step_parameters = {parameter: default for parameter, default in _argument_defaults(embedded).items()
                       if parameter != 'trained_model'}
    adapter_parameters = _argument_defaults(adapter)
    expected = {ARTIFACT_NAMES.get(parameter, parameter): default for parameter, default in step_parameters.items()
                if parameter not in V1_RUN_PAGE_FILES}
    assert {parameter: default for parameter, default in adapter_parameters.items()
            if parameter not in V2_RUN_PAGE_OUTPUTS} == expected
    imports = [node for node in ast.walk(adapter) if isinstance(node, ast.ImportFrom) and node.module == step.__name__]
    assert [[alias.name for alias in node.names] for node in imports] == [[step.__name__]]
    step_calls = [node for node in ast.walk(adapter)
                  if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == step.__name__]
    (call,) = step_calls
    # Every parameter of the step is passed on: none is left to a default the adapter does not show.
    assert len(call.args) + len(call.keywords) == len(step_parameters)
    assert {keyword.arg for keyword in call.keywords} <= set(step_parameters)
    # No step logic in an adapter: a handful of statements at most.
    assert len(list(ast.walk(adapter))) < 250


# ---------------------------------------------------------------------------------------------------- local runs

def _printed_paths(stdout: str) -> dict:
    return dict(re.findall(r'^  (\S+(?: \S+)?)\s{2,}(/\S+)$', stdout, re.MULTILINE))


def _run_locally(python, data, pipeline_root, serving_dir, hparams):
    argv = ['--run-local', '--data', str(data), '--pipeline_root', str(pipeline_root), '--serving_dir', serving_dir]
    return run_v2(python, *argv, *[f'--{name}={value}' for name, value in hparams.items()])


def _metadata(executor_output_path: str, artifact: str) -> dict:
    with open(executor_output_path, encoding='utf-8') as output_file:
        return json.load(output_file)['artifacts'][artifact]['artifacts'][0]['metadata']


@pytest.fixture(scope='module')
def local_runs(kfp2_python, small_data_path, tmp_path_factory):
    """Two local runs into one empty serving folder: a small model, then a worse one (10 training steps)."""
    serving_dir = str(tmp_path_factory.mktemp('serving') / 'mnist_model')
    first = _run_locally(kfp2_python, small_data_path, tmp_path_factory.mktemp('first'), serving_dir, SMALL_HPARAMS)
    assert first.returncode == 0, first.stdout + first.stderr
    served_after_first = sorted(os.listdir(serving_dir))
    worse = _run_locally(kfp2_python, small_data_path, tmp_path_factory.mktemp('worse'), serving_dir,
                         dict(SMALL_HPARAMS, epoch=10))
    assert worse.returncode == 0, worse.stdout + worse.stderr
    return {'first': first, 'worse': worse, 'serving_dir': serving_dir, 'served_after_first': served_after_first}


def test_local_run_promotes_with_v2_metrics(local_runs):
    stdout = local_runs['first'].stdout
    assert local_runs['served_after_first'] == ['1']
    assert re.search(r'^\[promote\] Promoted: version 1 \(test accuracy 0\.\d{4}\) exported to .*/mnist_model/1, '
                     r'the first version there \(1 000 test images, sha256 [0-9a-f]{8}\)\.$', stdout, re.MULTILINE)
    # The trainer's progress lines show, tagged with the step; kfp's executor chatter does not.
    assert any(line.startswith('[train] step ') for line in stdout.splitlines())
    assert 'KFP Executor' not in stdout and 'executor_input' not in stdout
    paths = _printed_paths(stdout)
    assert set(paths) == {'package', 'dataset', 'model', 'evaluation', 'evaluate_output', 'export_dir',
                          'promote_output', 'served version'}
    assert paths['served version'] == os.path.join(local_runs['serving_dir'], '1')
    with open(paths['package'], encoding='utf-8') as package, open(PACKAGE_PATH, encoding='utf-8') as committed:
        assert package.read() == committed.read()
    with open(paths['evaluation'], encoding='utf-8') as evaluation_file:
        evaluation = json.load(evaluation_file)
    assert evaluation['test_examples'] == 1000 and 0.5 < evaluation['accuracy'] <= 1.0
    assert f'accuracy={evaluation["accuracy"]:.6f}' in stdout.splitlines()
    # What the v2 run page shows: accuracy and loss as Metrics, the confusion matrix as ClassificationMetrics.
    assert _metadata(paths['evaluate_output'], 'metrics') == {'accuracy': evaluation['accuracy'],
                                                               'loss': evaluation['loss']}
    confusion = _metadata(paths['evaluate_output'], 'confusion_matrix')['confusionMatrix']
    assert [spec['displayName'] for spec in confusion['annotationSpecs']] == [str(digit) for digit in range(10)]
    assert [row['row'] for row in confusion['rows']] == evaluation['confusion_matrix']
    assert np.trace(np.array(evaluation['confusion_matrix'])) / 1000 == pytest.approx(evaluation['accuracy'])
    promotion = _metadata(paths['promote_output'], 'metrics')
    assert (promotion['promoted'], promotion['model-version']) == (1.0, 1.0) and 0.5 < promotion['candidate-accuracy']
    with open(paths['promote_output'], encoding='utf-8') as output_file:
        decision = json.load(output_file)['parameterValues']
    assert decision['promoted'] is True and decision['model_version'] == 1
    assert decision['decision'].startswith('Promoted: version 1 ')
    # Nothing of the run is left outside its folder: the steps' programs and temporary files stay inside it.
    root = os.path.dirname(paths['package'])
    assert all(path.startswith(root) for name, path in paths.items() if name != 'served version')
    assert not [name for name in os.listdir(root) if name.startswith('.tmp-')]


def test_local_run_declines_a_worse_model(local_runs):
    stdout = local_runs['worse'].stdout
    assert sorted(os.listdir(local_runs['serving_dir'])) == ['1']
    (decision,) = [line for line in stdout.splitlines() if line.startswith('[promote] Not promoted: ')]
    assert re.search(r'of version 1 \(1 000 test images, sha256 [0-9a-f]{8}\); --force_export exports it anyway\.$',
                     decision)
    paths = _printed_paths(stdout)
    assert 'served version' not in paths
    promotion = _metadata(paths['promote_output'], 'metrics')
    assert (promotion['promoted'], promotion['model-version']) == (0.0, 0.0)
    assert promotion['candidate-accuracy'] < promotion['served-accuracy'], 'both measured, shown on the run page'


def test_local_run_failure_is_one_clear_line(kfp2_python, tmp_path):
    process = run_v2(kfp2_python, '--run-local', '--data', str(tmp_path / 'missing.npz'),
                     '--pipeline_root', str(tmp_path / 'root'))
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == [
        f'mnist_pipeline_v2.py: error: step load-data failed: FileNotFoundError: {tmp_path}/missing.npz: no such '
        f'file or folder']


# ------------------------------------------------------------------------------------------ fake KFP v2 API server

class FakeKfpV2:
    """The part of the KFP v2beta1 REST API that the kfp 2 Client uses for upload, run and schedule, in memory.

    It has the interface test_pipeline._make_handler serves (authorized, login_redirect, handle, requests).
    """

    def __init__(self, token=None, multi_user=False):
        self.token, self.cookie, self.login_redirect = token, None, False
        self.multi_user = multi_user
        self.requests = []
        self.pipelines, self.versions, self.experiments, self.runs, self.recurring_runs = [], [], [], [], []
        self.next_id = 0

    def new_id(self, kind):
        self.next_id += 1
        return f'{kind}-{self.next_id}'

    def authorized(self, headers):
        return self.token is None or headers.get('Authorization') == f'Bearer {self.token}'

    @staticmethod
    def display_name_filter(query):
        if not query.get('filter'):
            return None
        predicates = json.loads(query['filter'])['predicates']
        return next(predicate['string_value'] if 'string_value' in predicate else predicate['stringValue']
                    for predicate in predicates if predicate['key'] == 'display_name')

    def handle(self, method, path, query, body):
        api = '/apis/v2beta1/'
        if method == 'GET' and path == api + 'healthz':
            return 200, {'multi_user': self.multi_user, 'commit_sha': 'fake', 'tag_name': '2.15.0'}
        if method == 'GET' and path == api + 'pipelines':
            name = self.display_name_filter(query)
            return 200, {'pipelines': [p for p in self.pipelines if name in (None, p['display_name'])]}
        if method == 'POST' and path == api + 'pipelines/upload':
            pipeline = {'pipeline_id': self.new_id('pipeline'), 'display_name': query['name'],
                        'description': query.get('description')}
            self.pipelines.append(pipeline)
            self.versions.append({'pipeline_id': pipeline['pipeline_id'], 'display_name': query['name'],
                                  'pipeline_version_id': self.new_id('version')})
            return 200, pipeline
        if method == 'POST' and path == api + 'pipelines/upload_version':
            if any(v['pipeline_id'] == query['pipelineid'] and v['display_name'] == query['name']
                   for v in self.versions):
                return 409, {'error': 'The name ' + query['name'] + ' already exist', 'code': 6}
            version = {'pipeline_id': query['pipelineid'], 'display_name': query['name'],
                       'pipeline_version_id': self.new_id('version'), 'description': query.get('description')}
            self.versions.append(version)
            return 200, version
        versions_path = re.fullmatch(r'/apis/v2beta1/pipelines/([^/]+)/versions', path)
        if method == 'GET' and versions_path:
            versions = [v for v in self.versions if v['pipeline_id'] == versions_path.group(1)]
            if query.get('sort_by') == 'created_at desc':
                versions = versions[::-1]
            return 200, {'pipeline_versions': versions[:int(query.get('page_size') or 10)],
                         'total_size': len(versions)}
        if method == 'GET' and path == api + 'experiments':
            name = self.display_name_filter(query)
            return 200, {'experiments': [e for e in self.experiments if name in (None, e['display_name'])]}
        if method == 'POST' and path == api + 'experiments':
            experiment = dict(body, experiment_id=self.new_id('experiment'))
            self.experiments.append(experiment)
            return 200, experiment
        if method == 'POST' and path == api + 'runs':
            run = dict(body, run_id=self.new_id('run'), state='PENDING')
            self.runs.append(run)
            return 200, run
        if method == 'GET' and path == api + 'recurringruns':
            return 200, {'recurringRuns': [r for r in self.recurring_runs
                                           if r['experiment_id'] == query.get('experiment_id')]}
        if method == 'POST' and path == api + 'recurringruns':
            recurring_run = dict(body, recurring_run_id=self.new_id('recurring-run'))
            self.recurring_runs.append(recurring_run)
            return 200, recurring_run
        return 404, {'error': f'no route {method} {path}', 'code': 5}


@pytest.fixture
def kfp_v2_server():
    """Starts a fake KFP v2 API on a free local port: kfp_v2_server(**FakeKfpV2 options) -> (fake, url)."""
    servers = []

    def start(**options):
        fake = FakeKfpV2(**options)
        server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _make_handler(fake))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return fake, f'http://127.0.0.1:{server.server_address[1]}'

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _client_environment(tmp_path, **variables):
    """Keeps the kfp 2 Client away from the user's ~/.config/kfp/context.json and the environment's credentials."""
    environment = {name: '' for name in ('KF_PIPELINES_COOKIE', 'KF_PIPELINES_TOKEN', 'KF_PIPELINES_ENDPOINT',
                                         'KF_PIPELINES_UI_ENDPOINT')}
    return dict(environment, HOME=str(tmp_path), **variables)


def _request_lines(requests):
    return [f'{request["method"]} {request["path"]}' for request in requests]


def test_upload_run_and_schedule_twice(kfp_v2_server, kfp2_python, tmp_path):
    fake, url = kfp_v2_server(token='abc.def')
    environment = _client_environment(tmp_path, KF_PIPELINES_TOKEN='abc.def')
    argv = ['--host', url, '--image', IMAGE, '--upload', '--run', '--schedule', '--epoch=1500',
            '--serving_pvc', 'workspace-mnist']
    first = run_v2(kfp2_python, *argv, env=environment, timeout=120)
    assert first.returncode == 0, first.stderr
    requests_of_first = len(fake.requests)
    second = run_v2(kfp2_python, *argv, env=environment, timeout=120)
    assert second.returncode == 0, second.stderr

    first_requests, second_requests = fake.requests[:requests_of_first], fake.requests[requests_of_first:]
    assert _request_lines(first_requests) == [
        'GET /apis/v2beta1/healthz',                       # our one-line check of the endpoint and credentials
        'GET /apis/v2beta1/healthz',                       # the Client's own: is it multi-user?
        'GET /apis/v2beta1/pipelines',                     # is the pipeline there? no
        'POST /apis/v2beta1/pipelines/upload',
        'GET /apis/v2beta1/pipelines/pipeline-1/versions',  # the version the upload made
        'GET /apis/v2beta1/experiments',                   # experiment MNIST? no
        'POST /apis/v2beta1/experiments',
        'POST /apis/v2beta1/runs',
        'GET /apis/v2beta1/recurringruns',                 # the schedule? no
        'POST /apis/v2beta1/recurringruns']
    assert _request_lines(second_requests) == [
        'GET /apis/v2beta1/healthz',
        'GET /apis/v2beta1/healthz',
        'GET /apis/v2beta1/pipelines',                     # there: upload a new version
        'GET /apis/v2beta1/pipelines/pipeline-1/versions',
        'POST /apis/v2beta1/pipelines/upload_version',
        'GET /apis/v2beta1/experiments',                   # there: reused
        'POST /apis/v2beta1/runs',
        'GET /apis/v2beta1/recurringruns']                 # there: not created again
    assert {request['authorization'] for request in fake.requests} == {'Bearer abc.def'}

    upload = first_requests[3]
    assert upload['query'] == {'name': 'mnist-image-classification-pipeline',
                               'description': 'Pipeline for MNIST Image Classification'}
    uploaded = upload['body']['uploadfile'].decode()
    with open(PACKAGE_PATH, encoding='utf-8') as committed:
        assert uploaded == committed.read().replace('<registry>/mnist-pipeline-kfp2:1.0.0', IMAGE)
    assert second_requests[4]['query'] == {'name': 'mnist-template', 'pipelineid': 'pipeline-1',
                                           'description': 'mnist pipeline template'}
    assert second_requests[4]['body']['uploadfile'] == upload['body']['uploadfile']
    assert first_requests[6]['body'] == {'display_name': 'MNIST', 'namespace': ''}
    assert json.loads(first_requests[5]['query']['filter'])['predicates'][0]['key'] == 'display_name'

    expected_parameters = dict(PARAMETER_DEFAULTS, epoch=1500, serving_pvc='workspace-mnist')
    first_run, second_run = first_requests[7]['body'], second_requests[6]['body']
    assert re.fullmatch(r'mnist-image-classification-pipeline-\d{8}-\d{6}', first_run['display_name'])
    assert {key: value for key, value in first_run.items() if key != 'display_name'} == {
        'experiment_id': 'experiment-3',
        'pipeline_version_reference': {'pipeline_id': 'pipeline-1', 'pipeline_version_id': 'version-2'},
        'runtime_config': {'parameters': expected_parameters}}
    # The second run runs the version just uploaded.
    assert second_run['pipeline_version_reference'] == {'pipeline_id': 'pipeline-1',
                                                        'pipeline_version_id': 'version-6'}
    assert f'{url}/#/runs/details/run-4' in first.stdout

    assert first_requests[8]['query']['experiment_id'] == 'experiment-3'
    recurring_run = first_requests[9]['body']
    assert recurring_run == {
        'display_name': 'mnist-pipeline-schedule', 'description': 'MNIST Image Classification Model Workflow. 1 Weeks',
        'experiment_id': 'experiment-3', 'mode': 'ENABLE', 'max_concurrency': 1, 'no_catchup': True,
        'trigger': {'periodic_schedule': {'interval_second': 604800}},
        'pipeline_version_reference': {'pipeline_id': 'pipeline-1', 'pipeline_version_id': 'version-2'},
        'runtime_config': {'parameters': expected_parameters}}
    assert 'Recurring run mnist-pipeline-schedule already exists (id recurring-run-5)' in second.stdout
    assert len(fake.recurring_runs) == 1 and len(fake.runs) == 2


def test_multi_user_kubeflow_needs_a_namespace(kfp_v2_server, kfp2_python, tmp_path):
    fake, url = kfp_v2_server(multi_user=True)
    process = run_v2(kfp2_python, '--host', url, '--run', env=_client_environment(tmp_path), timeout=120)
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == [
        f'mnist_pipeline_v2.py: error: {url} is a multi-user Kubeflow: give --namespace <your profile namespace>, '
        f'e.g. kubeflow-user-example-com']
    assert not [request for request in fake.requests if request['method'] == 'POST']


def test_refused_token_and_a_v1_backend_are_one_clear_line(kfp_v2_server, kfp2_python, tmp_path):
    fake, url = kfp_v2_server(token='right')
    process = run_v2(kfp2_python, '--host', url, '--image', IMAGE, '--upload',
                     env=_client_environment(tmp_path, KF_PIPELINES_TOKEN='wrong'), timeout=120)
    assert process.returncode == 1
    (line,) = process.stderr.strip().splitlines()
    assert line.startswith(f'mnist_pipeline_v2.py: error: {url} refused the credentials (HTTP 401)')
    # A KFP 1.x backend has no v2 API: its v2 healthz is 404.
    fake, url = kfp_v2_server()
    process = run_v2(kfp2_python, '--host', url + '/v1-only', '--run', env=_client_environment(tmp_path), timeout=120)
    assert process.returncode == 1
    (line,) = process.stderr.strip().splitlines()
    assert 'a KFP 1.x backend has no v2 API: use mnist_pipeline.py' in line


@pytest.mark.parametrize('argv, message', [
    (['--host', 'http://localhost:8080', '--upload'], '--upload needs --image <your registry>/mnist-pipeline-kfp2'),
    (['--run-local', '--image', IMAGE], '--image is for compiling and --upload'),
    (['--host', 'http://localhost:8080', '--run', '--image', IMAGE], '--image is for compiling and --upload'),
    (['--upload'], '--upload, --run and --schedule need --host'),
    (['--run-local', '--serving_pvc', 'claim'], '--serving_pvc and --serving_path are for --run and --schedule'),
])
def test_bad_arguments_are_argparse_errors(kfp2_python, argv, message):
    process = run_v2(kfp2_python, *argv, timeout=120)
    assert process.returncode == 2
    assert message in process.stderr


# ------------------------------------------------------------------------------------------ run_demo.py --pipeline v2

def test_run_demo_pipeline_v2_runs_the_v2_script_with_the_kfp2_python(tmp_path, monkeypatch):
    import run_demo

    demo = run_demo.Demo(str(tmp_path / 'report'), str(tmp_path / 'serving'), quick=True, trials=2, parallel=2,
                         echo=print, kfp2_python='/opt/kfp2/bin/python')
    commands = []

    def run_command(name, argv, environment=None):
        commands.append(argv)
        return ['[promote] Promoted: version 2 (test accuracy 0.9100) exported to /x/2; it replaces 0.9000 of '
                'version 1.']

    monkeypatch.setattr(demo, 'run_command', run_command)
    demo.pipeline()
    (command,) = commands
    assert command[:3] == ['/opt/kfp2/bin/python', os.path.join('mnist_model', 'mnist_pipeline_v2.py'), '--run-local']
    stage = demo.stage('pipeline')
    assert stage['title'] == 'Weekly pipeline run (KFP v2) on a short budget, run locally'
    assert stage['cluster_command'].startswith('python3 mnist_model/mnist_pipeline_v2.py --host <KFP URL> --image ')
    # The weekly run on a short budget, as with v1; the serving folder of this stub run holds no version.
    assert '--epoch=25' in command
    assert demo.summary['versions'] == [{'version': 2, 'accuracy': 0.91, 'source': 'pipeline', 'decision': 'promoted',
                                         'message': demo.summary['versions'][0]['message'],
                                         'served_before': None, 'served_after': None, 'per_digit': None}]


def test_run_demo_pipeline_v2_without_the_environment_is_one_clear_error(tmp_path):
    process = subprocess.run([sys.executable, os.path.join(REPO, 'run_demo.py'), '--quick', '--pipeline', 'v2',
                              '--output', str(tmp_path / 'report')], cwd=REPO, capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, MNIST_KFP2_PYTHON=str(tmp_path / 'no-python'),
                                                  HOME=str(tmp_path)))
    assert process.returncode == 2
    assert 'run_demo.py: error: --pipeline v2 needs the kfp 2 environment: set MNIST_KFP2_PYTHON' in process.stderr
    assert not os.path.exists(tmp_path / 'report')


def test_the_v2_image_holds_the_pinned_kfp_on_the_v1_tensorflow_image():
    import mnist_pipeline

    with open(os.path.join(REPO, 'Dockerfile.kfp2'), encoding='utf-8') as dockerfile:
        text = dockerfile.read()
    with open(os.path.join(REPO, 'requirements-kfp2.txt'), encoding='utf-8') as requirements:
        kfp_pin = next(line.strip() for line in requirements if line.startswith('kfp=='))
    assert re.findall(r'^FROM (\S+)$', text, re.MULTILINE) == [mnist_pipeline.BASE_IMAGE]
    assert f' {kfp_pin} ' in text and '-c /tmp/requirements-base.txt' in text
    assert 'docker build -f Dockerfile.kfp2 -t <registry>/mnist-pipeline-kfp2:1.0.0 .' in text
