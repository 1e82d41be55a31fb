"""Tests of mnist_hyper_tuning.py: Katib trial output, the Katib Experiment manifest, and the local tuner.

The trial and tuner tests run the real script in subprocesses on the small data slice for a few dozen steps; the
manifest is checked against the rules of Katib's v1beta1 admission webhook (pkg/webhook/v1beta1/experiment/validator).
Run: python -m pytest -q tests/test_hyper_tuning.py
"""
import csv
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml

import mnist_hyper_tuning as tuning
import trial_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'mnist_hyper_tuning.py')
MANIFEST = os.path.join(REPO, 'katib-experiment.yaml')
# A space small enough for seconds-long trials on the data slice: one point apart from epoch and learning rate.
TINY_SPACE = ['--space', 'num_hidden_layer_1=32:32:32', '--space', 'num_hidden_layer_2=16:16:16',
              '--space', 'dropout=1.0:1.0:0.25']


def run_script(flags, timeout=180, **options):
    return subprocess.run([sys.executable, SCRIPT] + flags, capture_output=True, text=True, timeout=timeout,
                          cwd=options.pop('cwd', REPO), **options)


def version_folders():
    """The integer version folders in mnist_model/, where mnist.py exports by default."""
    return sorted(name for name in os.listdir(os.path.join(REPO, 'mnist_model')) if name.isdigit())


# Katib's default metricsFormat, which reads a `name=value` pair anywhere in a line.
KATIB_DEFAULT_FORMAT = r'([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)'
# Flags of a trial that takes seconds: small layers, 60 steps (on the data slice).
TINY_TRIAL = ['--epoch=60', '--num_hidden_layer_1=32', '--num_hidden_layer_2=16']


def committed_metrics_formats():
    with open(MANIFEST) as manifest_file:
        return yaml.safe_load(manifest_file)['spec']['metricsCollectorSpec']['source']['filter']['metricsFormat']


def katib_values(text, formats=None):
    """What Katib's StdOut collector reads from a trial's merged stdout and stderr with the committed Experiment's
    metricsFormat, restated from file-metricscollector.go: the file is split at '\n', a line that names no metric is
    skipped, and each pattern is applied with FindAllStringSubmatch (group 1 the name, group 2 the value, trimmed)."""
    found = {'accuracy': [], 'loss': []}
    patterns = [re.compile(text_format) for text_format in (formats or committed_metrics_formats())]
    for line in text.split('\n'):
        if not any(name in line for name in found):
            continue
        for pattern in patterns:
            for match in pattern.finditer(line):
                if match.group(1).strip() in found and match.group(2).strip():
                    found[match.group(1).strip()].append(float(match.group(2)))
    return found


def metric_lines(text):
    return [line for line in text.split('\n') if tuning.METRIC_LINE_PATTERN.search(line)]


# ---------------------------------------------------------------------------------------------------------------------
# Katib's admission webhook rules, restated from validator.go (ValidateExperiment and the functions it calls).
# ---------------------------------------------------------------------------------------------------------------------
KATIB_NAME = re.compile(r'[a-z]([-a-z0-9]*[a-z0-9])?')
KATIB_LEFTOVER_PARAMETER = re.compile(r'\$\{trialParameters\..+?\}')
KATIB_ALGORITHM_NAMES = {'random', 'grid', 'bayesianoptimization', 'tpe', 'multivariate-tpe', 'cmaes', 'hyperband'}


def webhook_errors(experiment):
    """The rule violations Katib's validating webhook would report for this Experiment (empty = admitted)."""
    errors = []
    spec = experiment['spec']
    if not KATIB_NAME.fullmatch(experiment['metadata']['name']):
        errors.append('metadata.name does not match the naming convention')
    max_trials, parallel, max_failed = (spec.get(key) for key in
                                        ('maxTrialCount', 'parallelTrialCount', 'maxFailedTrialCount'))
    if max_failed is not None and max_failed < 0:
        errors.append('maxFailedTrialCount < 0')
    if max_trials is not None and max_trials <= 0:
        errors.append('maxTrialCount <= 0')
    if parallel is not None and parallel <= 0:
        errors.append('parallelTrialCount <= 0')
    if None not in (max_failed, max_trials) and max_failed > max_trials:
        errors.append('maxFailedTrialCount > maxTrialCount')
    if None not in (parallel, max_trials) and parallel > max_trials:
        errors.append('parallelTrialCount > maxTrialCount')
    objective = spec.get('objective') or {}
    if objective.get('type') not in ('maximize', 'minimize'):
        errors.append('objective.type must be maximize or minimize')
    if not objective.get('objectiveMetricName'):
        errors.append('objective.objectiveMetricName missing')
    metric_names = [objective.get('objectiveMetricName')] + objective.get('additionalMetricNames', [])
    if len(set(metric_names)) != len(metric_names):
        errors.append('metric names repeated')
    if spec.get('algorithm', {}).get('algorithmName') not in KATIB_ALGORITHM_NAMES:
        errors.append('unknown algorithm')
    parameters = spec.get('parameters') or []
    if not parameters:
        errors.append('spec.parameters must be specified')
    for parameter in parameters:
        space = parameter.get('feasibleSpace') or {}
        if parameter.get('parameterType') not in ('int', 'double', 'categorical', 'discrete'):
            errors.append(f'{parameter.get("name")}: unsupported parameterType')
        if not space:
            errors.append(f'{parameter.get("name")}: feasibleSpace missing')
        elif parameter['parameterType'] in ('int', 'double'):
            if space.get('list'):
                errors.append(f'{parameter["name"]}: list given for {parameter["parameterType"]}')
            if not space.get('min') or not space.get('max'):
                errors.append(f'{parameter["name"]}: min or max missing')
            if not all(isinstance(space.get(key, ''), str) for key in ('min', 'max', 'step')):
                errors.append(f'{parameter["name"]}: feasibleSpace values must be strings')
    template = spec.get('trialTemplate') or {}
    if not template.get('primaryContainerName'):
        errors.append('trialTemplate.primaryContainerName missing')
    if not template.get('successCondition') or not template.get('failureCondition'):
        errors.append('trialTemplate success/failure condition missing')
    trial_spec = template.get('trialSpec')
    if trial_spec is None or template.get('trialParameters') is None:
        return errors + ['trialTemplate.trialSpec or trialParameters missing']
    # The webhook substitutes each trial parameter into the template's JSON text and looks for what is left.
    template_text = json.dumps(trial_spec)
    experiment_parameter_names = {parameter.get('name') for parameter in parameters}
    seen_names, seen_references = set(), set()
    for trial_parameter in template['trialParameters']:
        name, reference = trial_parameter.get('name', ''), trial_parameter.get('reference', '')
        if not name or not reference or '{' in name or '}' in name:
            errors.append(f'trialParameter {name!r}: name and reference required, no braces')
            continue
        if name in seen_names or reference in seen_references:
            errors.append(f'trialParameter {name!r}: duplicated name or reference')
            continue
        seen_names.add(name)
        seen_references.add(reference)
        if reference not in experiment_parameter_names:
            errors.append(f'trialParameter {name!r}: reference {reference!r} is not in spec.parameters')
        placeholder = '${trialParameters.' + name + '}'
        if placeholder not in template_text:
            return errors + [f'trialParameter {name!r} is not used in trialSpec']
        template_text = template_text.replace(placeholder, 'test-value')
    leftovers = KATIB_LEFTOVER_PARAMETER.findall(template_text)
    if leftovers:
        errors.append(f'trialSpec uses {leftovers} that are not trialParameters')
    run_spec = json.loads(template_text)
    if run_spec.get('metadata', {}).get('name') or run_spec.get('metadata', {}).get('namespace'):
        errors.append('trialSpec metadata.name and metadata.namespace must be omitted')
    if not run_spec.get('apiVersion') or not run_spec.get('kind'):
        errors.append('trialSpec apiVersion and kind required')
    # Katib injects the StdOut collector into the container named primaryContainerName and needs its command.
    containers = run_spec.get('spec', {}).get('template', {}).get('spec', {}).get('containers', [])
    primary = [container for container in containers if container.get('name') == template.get('primaryContainerName')]
    if len(primary) != 1 or not primary[0].get('command'):
        errors.append('no primary container with an explicit command')
    if spec.get('metricsCollectorSpec', {}).get('collector', {}).get('kind') not in (
            'StdOut', 'File', 'TensorFlowEvent', 'PrometheusMetric', 'Custom', 'None', 'Push'):
        errors.append('invalid metrics collector kind')
    if spec.get('algorithm', {}).get('algorithmName') == 'grid':
        errors += grid_errors(parameters, max_trials)
    return errors + metrics_format_errors(spec.get('metricsCollectorSpec', {}))


def metrics_format_errors(collector_spec):
    """validateMetricsCollector's check of source.filter.metricsFormat: each pattern compiles and has two top
    subexpressions (name, value); and the pod webhook passes the list to the collector joined with ';'."""
    errors = []
    for text_format in ((collector_spec.get('source') or {}).get('filter') or {}).get('metricsFormat') or []:
        try:
            re.compile(text_format)
        except re.error as error:
            errors.append(f'metricsFormat {text_format!r}: invalid filter: {error}')
            continue
        if not re.match(r'.*\(.*\).*\(.*\).*', text_format):
            errors.append(f'metricsFormat {text_format!r}: two top subexpressions are required')
        if ';' in text_format:
            errors.append(f'metricsFormat {text_format!r}: the collector splits the list at ;')
    return errors


def grid_errors(parameters, max_trials):
    """Katib's grid suggestion: every int/double needs a step, and maxTrialCount must fit in the grid."""
    if any(not parameter['feasibleSpace'].get('step') for parameter in parameters):
        return ['grid needs a step for every parameter']
    points = 1
    for parameter in parameters:
        space = parameter['feasibleSpace']
        points *= int((float(space['max']) - float(space['min'])) / float(space['step']) + 1e-9) + 1
    return [f'maxTrialCount {max_trials} > {points} grid points'] if max_trials > points else []


def default_experiment(**changes):
    settings = dict(algorithm='random', trial_counts={'parallel': 3, 'max_trials': 12, 'max_failed_trials': 3},
                    goal=0.965, image=tuning.DEFAULT_IMAGE, namespace=tuning.DEFAULT_NAMESPACE)
    settings.update(changes)
    trial_template = tuning.build_trial_template(tuning.SEARCH_SPACE, settings['image'])
    return tuning.build_experiment(tuning.SEARCH_SPACE, settings['algorithm'], settings['trial_counts'],
                                   settings['goal'], trial_template, settings['namespace'])


# ---------------------------------------------------------------------------------------------------------------------
# Manifest mode
# ---------------------------------------------------------------------------------------------------------------------
def test_committed_manifest_regenerates_byte_identically(tmp_path):
    result = run_script(['--katib-experiment', '-o', 'katib-experiment.yaml'], timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(MANIFEST) as manifest_file:
        assert (tmp_path / 'katib-experiment.yaml').read_text() == manifest_file.read(), \
            'run: python3 mnist_hyper_tuning.py --katib-experiment -o katib-experiment.yaml'


def test_manifest_header_names_its_command_and_file(tmp_path):
    flags = ['--katib-experiment', '--image', 'registry.example.com/mnist:2.0.1', '--namespace', '']
    result = run_script(flags + ['-o', 'my experiment.yaml'], timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header = (tmp_path / 'my experiment.yaml').read_text().splitlines()[:2]
    assert header == [
        "# Katib Experiment for the MNIST MLP. Generated by `python3 mnist_hyper_tuning.py --katib-experiment --image "
        "registry.example.com/mnist:2.0.1 --namespace '' -o 'my experiment.yaml'`;",
        "# edit the search space there, not here. Apply: kubectl apply -f 'my experiment.yaml'"]
    # Written to stdout, the manifest says to pipe the same command into kubectl.
    result = run_script(flags, timeout=60, cwd=tmp_path)
    assert result.stdout.splitlines()[1] == (
        "# edit the search space there, not here. Apply: python3 mnist_hyper_tuning.py --katib-experiment --image "
        "registry.example.com/mnist:2.0.1 --namespace '' | kubectl apply -f -")


def test_manifest_round_trips_and_states_the_demo_experiment():
    with open(MANIFEST) as manifest_file:
        experiment = yaml.safe_load(manifest_file)
    assert experiment == default_experiment()
    spec = experiment['spec']
    assert (experiment['apiVersion'], experiment['kind']) == ('kubeflow.org/v1beta1', 'Experiment')
    assert experiment['metadata']['name'] == 'mnist-classification-hyperparam'
    assert experiment['metadata']['annotations']['description']
    assert spec['objective'] == {'type': 'maximize', 'goal': 0.965, 'objectiveMetricName': 'accuracy',
                                 'additionalMetricNames': ['loss']}
    assert (spec['parallelTrialCount'], spec['maxTrialCount'], spec['maxFailedTrialCount']) == (3, 12, 3)
    assert spec['metricsCollectorSpec'] == {'collector': {'kind': 'StdOut'},
                                            'source': {'filter': {'metricsFormat': [tuning.METRIC_LINE_FORMAT]}}}
    assert [(parameter['name'], parameter['parameterType'], parameter['feasibleSpace']) for parameter in
            spec['parameters']] == [
        ('num_hidden_layer_1', 'int', {'min': '64', 'max': '256', 'step': '64'}),
        ('num_hidden_layer_2', 'int', {'min': '64', 'max': '256', 'step': '64'}),
        ('dropout', 'double', {'min': '0.25', 'max': '1.0', 'step': '0.25'}),
        ('learning_rate', 'double', {'min': '0.01', 'max': '0.1', 'step': '0.01'}),
        ('epoch', 'int', {'min': '1000', 'max': '3000', 'step': '500'})]
    template = spec['trialTemplate']
    assert all(item['reference'] == item['name'] for item in template['trialParameters'])
    job = template['trialSpec']
    assert (job['apiVersion'], job['kind']) == ('batch/v1', 'Job')
    pod = job['spec']['template']
    assert pod['metadata']['annotations'] == {'sidecar.istio.io/inject': 'false'}
    assert pod['spec']['restartPolicy'] == 'Never'
    container, = pod['spec']['containers']
    assert container['name'] == template['primaryContainerName']
    assert re.fullmatch(r'(<registry>/)?[\w./-]+:\d+\.\d+\.\d+', container['image']), \
        'the image must carry a pinned version tag'
    assert container['command'][:2] == ['python3', '/opt/mlops-demo/mnist_hyper_tuning.py']


def test_manifest_passes_the_katib_webhook_rules():
    assert webhook_errors(default_experiment()) == []
    for algorithm in tuning.KATIB_ALGORITHMS:
        assert webhook_errors(default_experiment(algorithm=algorithm, namespace='')) == [], algorithm


def test_webhook_check_catches_what_katib_rejects():
    # The rules above must be able to fail: each broken copy of the manifest is reported.
    broken = default_experiment()
    broken['spec']['trialTemplate']['trialSpec']['spec']['template']['spec']['containers'][0]['command'][2] = \
        '--num_hidden_layer_1=${trialParameters.units}'
    assert any('not used' in error for error in webhook_errors(broken))
    broken = default_experiment()
    broken['spec']['trialTemplate']['trialSpec']['spec']['template']['spec']['containers'][0]['command'].append(
        '--batch_size=${trialParameters.batch_size}')
    assert any('not trialParameters' in error for error in webhook_errors(broken))
    broken = default_experiment(trial_counts={'parallel': 13, 'max_trials': 12, 'max_failed_trials': 13})
    assert len(webhook_errors(broken)) == 2
    broken = default_experiment()
    broken['spec']['trialTemplate']['trialSpec']['metadata'] = {'name': 'fixed'}
    broken['spec']['parameters'][0]['feasibleSpace']['list'] = ['64']
    broken['spec']['objective']['additionalMetricNames'].append('accuracy')
    broken['metadata']['name'] = 'MNIST_tuning'
    assert len(webhook_errors(broken)) == 4
    broken = default_experiment(algorithm='grid')
    del broken['spec']['parameters'][2]['feasibleSpace']['step']
    assert webhook_errors(broken) == ['grid needs a step for every parameter']
    broken = default_experiment()
    broken['spec']['metricsCollectorSpec']['source']['filter']['metricsFormat'] = ['accuracy=([0-9.]+)', '(a|b)=(+)']
    errors = webhook_errors(broken)
    assert len(errors) == 2 and 'two top subexpressions' in errors[0] and 'invalid filter' in errors[1], errors


def test_trial_command_substitutes_to_a_valid_shell_line():
    # Katib joins the command with spaces and runs it with `sh -c`, so every substituted word must be shell-safe.
    experiment = default_experiment()
    template = json.dumps(experiment['spec']['trialTemplate']['trialSpec'])
    trial = tuning.propose_trials(tuning.SEARCH_SPACE, 'random', 1, seed=3)[0]
    for name, value in trial.items():
        template = template.replace('${trialParameters.' + name + '}', tuning.format_value(value))
    command = json.loads(template)['spec']['template']['spec']['containers'][0]['command']
    assert all(shlex.quote(word) == word for word in command)
    assert command[2:7] == tuning.hyperparameter_flags(trial)


def test_manifest_flags(tmp_path):
    output = tmp_path / 'experiment.yaml'
    result = run_script(['--katib-experiment', '-o', str(output), '--algorithm', 'grid', '--parallel', '2',
                         '--max_trials', '4', '--max_failed_trials', '1', '--namespace', '', '--image',
                         'registry.example.com/mnist:2.0.1', '--goal', '0.97', '--space', 'epoch=1000:2000:1000'],
                        timeout=60)
    assert result.returncode == 0, result.stderr
    experiment = yaml.safe_load(output.read_text())
    assert webhook_errors(experiment) == []
    spec = experiment['spec']
    assert 'namespace' not in experiment['metadata']
    assert (spec['algorithm']['algorithmName'], spec['objective']['goal']) == ('grid', 0.97)
    assert (spec['parallelTrialCount'], spec['maxTrialCount'], spec['maxFailedTrialCount']) == (2, 4, 1)
    assert spec['parameters'][4]['feasibleSpace'] == {'min': '1000', 'max': '2000', 'step': '1000'}
    container = spec['trialTemplate']['trialSpec']['spec']['template']['spec']['containers'][0]
    assert container['image'] == 'registry.example.com/mnist:2.0.1'


@pytest.mark.parametrize('flags, message', [
    (['--local', '--learning_rate=0.05'], '--learning_rate does not apply in local mode'),
    (['--katib-experiment', '--data=x.npz'], '--data does not apply in manifest mode'),
    (['--image=x:1.0.0'], '--image does not apply in trial mode; it needs --katib-experiment'),
    (['--max_trials', '3'], '--max_trials does not apply in trial mode; it needs --local (tune here) or '
                            '--katib-experiment (write the Katib Experiment)'),
    (['--katib-experiment', '--epoch=100'], '--epoch does not apply in manifest mode (narrow the search space'),
    # A value with a line break stays on the error line: it cannot start a (metric) line of its own.
    (['x\naccuracy=0.999000'], 'unrecognized arguments: x\\naccuracy=0.999000'),
    (['--katib-experiment', '--parallel', '13'], 'must not exceed --max_trials'),
    (['--local', '--algorithm', 'tpe'], 'runs on Katib only'),
    (['--local', '--space', 'units=1:2:1'], "unknown parameter 'units'"),
    (['--local', '--space', 'epoch=200:100:50'], 'MIN <= MAX'),
    (['--local', '--algorithm', 'grid', '--space', 'epoch=1000:1000:1', '--space', 'dropout=1.0:1.0:1',
      '--space', 'learning_rate=0.1:0.1:1', '--space', 'num_hidden_layer_1=64:64:1', '--max_trials', '20'],
     'exceeds the 4 grid points'),
    (['--local', '--max_trials', '0'], 'must be an integer >= 1'),
    (['--katib-experiment', '--space', 'dropout=0.5:1.5:0.5'], 'dropout must be a keep probability in (0, 1]'),
    (['--katib-experiment', '--space', 'learning_rate=-1:0.1:0.1'], 'learning_rate must be a number > 0'),
    (['--katib-experiment', '--goal', 'nan'], 'must be a test accuracy in (0, 1]'),
])
def test_flag_errors_are_one_line_and_exit_2(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['mnist_hyper_tuning.py'] + flags)
    with pytest.raises(SystemExit) as stopped:
        tuning.main()
    assert stopped.value.code == 2
    output = capsys.readouterr().err
    error = output.strip().splitlines()[-1]
    assert message in error and 'Traceback' not in error
    assert not metric_lines(output)


# ---------------------------------------------------------------------------------------------------------------------
# Proposals
# ---------------------------------------------------------------------------------------------------------------------
def test_same_seed_proposes_the_same_trials():
    first = tuning.propose_trials(tuning.SEARCH_SPACE, 'random', 12, seed=7)
    assert first == tuning.propose_trials(tuning.SEARCH_SPACE, 'random', 12, seed=7)
    assert first != tuning.propose_trials(tuning.SEARCH_SPACE, 'random', 12, seed=8)
    assert len({tuple(trial.values()) for trial in first}) == 12, 'random search repeated a point'
    for parameter in tuning.SEARCH_SPACE:
        assert {trial[parameter.name] for trial in first} <= set(tuning.grid_values(parameter))
    assert tuning.grid_values(tuning.SEARCH_SPACE[3]) == [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]
    assert tuning.count_combinations(tuning.SEARCH_SPACE) == 4 * 4 * 4 * 10 * 5


def test_grid_walks_the_grid_in_order_and_random_stops_at_its_size():
    space = tuning.override_space(tuning.SEARCH_SPACE, ['num_hidden_layer_1=64:128:64', 'num_hidden_layer_2=64:64:1',
                                                        'dropout=1.0:1.0:1', 'learning_rate=0.05:0.05:1',
                                                        'epoch=1000:2000:1000'])
    grid = tuning.propose_trials(space, 'grid', 10, seed=0)
    assert [(trial['num_hidden_layer_1'], trial['epoch']) for trial in grid] == [
        (64, 1000), (64, 2000), (128, 1000), (128, 2000)]
    assert len(tuning.propose_trials(space, 'random', 10, seed=0)) == 4


def test_stop_rules_follow_katib():
    rule = {'goal': 0.9, 'stop_at_goal': True, 'max_failed_trials': 2}
    succeeded = {'status': 'succeeded', 'accuracy': 0.95}
    failed = {'status': 'failed', 'accuracy': None}
    assert tuning.check_stop([failed], rule) == ''
    assert tuning.check_stop([failed, failed], rule).startswith('2 trials failed')
    assert tuning.check_stop([failed, succeeded], rule).startswith('goal reached')
    assert tuning.check_stop([succeeded], dict(rule, stop_at_goal=False)) == ''


def test_the_metric_pattern_reads_whole_metric_lines_only():
    pattern = re.compile(tuning.METRIC_LINE_FORMAT)
    assert pattern.groups == 2 and tuning.METRIC_LINE_FORMAT in committed_metrics_formats()
    text = '\n'.join(['accuracy=0.981200', 'loss=0.063400',
                      # A path, a quoted record, spaces, a carriage return, another metric, other digits, exponents.
                      'exported to /tmp/accuracy=0.999/1', "ValueError: could not convert string to float: 'accuracy=9'",
                      ' accuracy=0.5', 'accuracy=0.5 ', 'accuracy = 0.5', 'accuracy=0.5\r', 'val_accuracy=0.5',
                      'accuracy=\u0660.\u0669', 'accuracy=1e9', 'accuracy=-0.5', 'accuracy=0.5loss=0.1', 'loss='])
    assert katib_values(text) == tuning.parse_katib_metrics(text) == {'accuracy': [0.9812], 'loss': [0.0634]}
    # Katib's default pattern reads the pairs inside those lines too: what the Experiment no longer does.
    assert len(katib_values(text, [KATIB_DEFAULT_FORMAT])['accuracy']) > 5


def test_the_tuner_fails_a_trial_without_exactly_one_accuracy_in_range(tmp_path):
    masked = trial_output.MASK + 'accuracy=0.999000'
    cases = {'accuracy=0.500000\nloss=0.300000\n': ('succeeded', ''),
             f'{masked}\naccuracy=0.500000\r\naccuracy=0.600000\nloss=0.300000\n': ('succeeded', ''),
             'loss=0.300000\n': ('failed', '0 accuracy= lines in the output, expected 1'),
             'accuracy=0.500000\naccuracy=0.600000\nloss=0.3\n': ('failed', '2 accuracy= lines'),
             'accuracy=0.500000\nloss=0.3\nloss=0.3\n': ('failed', '2 loss= lines'),
             'accuracy=1.500000\nloss=0.300000\n': ('failed', 'accuracy=1.5 is not a test accuracy in [0, 1]')}
    for number, (log, (status, error)) in enumerate(cases.items()):
        log_path = tmp_path / f'trial-{number}.log'
        log_path.write_bytes(log.encode())
        record = tuning.collect_trial({}, 0, str(log_path))
        assert record['status'] == status and error in record.get('error', ''), (log, record)
        if status == 'succeeded':
            assert (record['accuracy'], record['loss']) == (0.6 if '0.600000' in log else 0.5, 0.3)
    assert tuning.collect_trial({}, 1, str(log_path))['error'] == 'exit code 1: loss=0.300000'


def test_the_guard_sends_all_other_output_to_stderr_and_masks_metric_lines():
    # Python and native writes to both streams, a line split over two writes and an unfinished last line.
    program = textwrap.dedent('''
        import os, sys
        import mnist_hyper_tuning as tuning, trial_output
        with trial_output.other_output_masked(tuning.METRIC_LINE_PATTERN):
            print('accuracy=0.100000')
            print('path /x\\nloss=0.200000\\n/y', file=sys.stderr)
            sys.stdout.write('accuracy=0.3'); sys.stdout.write('00000\\nprogress\\n')
            os.write(1, b'accuracy=0.400000\\n')
            os.write(2, b'x\\naccuracy=0.500000')
        print('accuracy=0.900000\\nloss=0.100000', flush=True)
    ''')
    result = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'accuracy=0.900000\nloss=0.100000\n'
    assert katib_values(result.stderr + result.stdout) == {'accuracy': [0.9], 'loss': [0.1]}
    mask = trial_output.MASK
    assert sorted(result.stderr.splitlines()) == sorted([
        f'{mask}accuracy=0.100000', 'path /x', f'{mask}loss=0.200000', '/y', f'{mask}accuracy=0.300000', 'progress',
        f'{mask}accuracy=0.400000', 'x', f'{mask}accuracy=0.500000']), result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Trial mode and the local tuner (real training on the data slice)
# ---------------------------------------------------------------------------------------------------------------------
def test_trial_with_unreadable_data_fails_in_one_line(tmp_path):
    broken = tmp_path / 'broken.npz'
    broken.write_bytes(b'not an npz file')
    result = run_script(['--epoch=60', f'--data={broken}'], timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count('\n') == 0 and result.stderr.startswith('error:'), result.stderr
    assert 'broken.npz: not an MNIST npz file or IDX folder (not a zip archive); expected ' in result.stderr
    assert katib_values(result.stdout + result.stderr) == {'accuracy': [], 'loss': []}
    local = run_script(['--local', f'--data={broken}', '-o', str(tmp_path / 'tuning')], timeout=60)
    assert local.returncode == 1 and local.stderr.startswith('error:') and 'Traceback' not in local.stderr


def test_trial_that_did_not_learn_reports_its_metrics_and_warns(small_data_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['mnist_hyper_tuning.py', '--learning_rate=50', '--epoch=200',
                                      '--num_hidden_layer_1=16', '--num_hidden_layer_2=16', f'--data={small_data_path}'])
    exit_code = tuning.main()
    captured = capsys.readouterr()
    # Katib must record the trial: exit 0 and exactly one value per metric, the warning adding none. Stdout holds the
    # two metric lines only; the rest went to stderr.
    assert exit_code == 0, captured.err
    values = katib_values(captured.out + captured.err)
    assert len(values['accuracy']) == 1 and values['accuracy'][0] <= 0.2 and len(values['loss']) == 1
    assert captured.out == f'accuracy={values["accuracy"][0]:.6f}\nloss={values["loss"][0]:.6f}\n'
    assert re.fullmatch(r'(step +\d+/200 [^\n]+\n)+Trial finished in \d+\.\d s\nwarning: test accuracy [^\n]+\n',
                        captured.err), captured.err
    assert '--learning_rate 50 is probably too high' in captured.err


def measured_metric_lines(version_dir):
    """The metric lines a trial must print for the version it exported: its run record holds the accuracy the gate
    measured through the exported SavedModel (equal to the trainer's to the last digit) and evaluate's loss."""
    with open(os.path.join(version_dir, 'assets.extra', 'run.json')) as record_file:
        record = json.load(record_file)
    return f'accuracy={record["accuracy"]:.6f}\nloss={record["loss"]:.6f}\n'


def check_trial_reports_its_own_metrics(result, reference, tmp_path):
    """The trial's stdout is its two metric lines, the reference's; Katib and the local tuner read
    exactly those from its merged output, wherever the trial's other lines quote the hostile text."""
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference and len(metric_lines(reference)) == 2
    accuracy, loss = (float(line.split('=')[1]) for line in reference.split())
    merged = result.stderr + result.stdout  # Katib's `1>file 2>&1`: the metric lines come last.
    assert katib_values(merged) == {'accuracy': [accuracy], 'loss': [loss]}
    log_path = tmp_path / 'trial.log'
    log_path.write_text(merged)
    record = tuning.collect_trial({}, result.returncode, str(log_path))
    assert (record['status'], record['accuracy'], record['loss']) == ('succeeded', accuracy, loss)
    return merged


def test_a_trial_exporting_into_a_hostile_folder_reports_its_real_accuracy(small_data_path, tmp_path):
    # The folder's name holds a metric pair, and a line break then a whole metric line.
    export_dir = tmp_path / 'accuracy=0.999' / 'x\naccuracy=0.999000\n' / 'models'
    result = run_script(TINY_TRIAL + [f'--data={small_data_path}', f'--export_dir={export_dir}'])
    assert result.returncode == 0, result.stderr
    merged = check_trial_reports_its_own_metrics(result, measured_metric_lines(export_dir / '1'), tmp_path)
    # The promotion line names the folder, so its line break reached stderr: masked there. Katib's default pattern
    # would have read 0.999 from it.
    assert trial_output.MASK + 'accuracy=0.999000' in result.stderr.splitlines(), result.stderr
    assert 0.999 in katib_values(merged, [KATIB_DEFAULT_FORMAT])['accuracy']
    assert os.listdir(export_dir) == ['1']


def test_local_tuner_runs_trials_in_parallel_and_reports_the_best(small_data_path, tmp_path):
    output = tmp_path / 'tuning'
    versions_before = version_folders()
    # Grid order: learning rate 0.05 for 40 and 80 steps, then a learning rate that makes training diverge.
    result = run_script(['--local', '--algorithm', 'grid', '--max_trials', '3', '--parallel', '2', '-o', str(output),
                         f'--data={small_data_path}', '--space', 'learning_rate=0.05:1e20:1e20',
                         '--space', 'epoch=40:80:40'] + TINY_SPACE, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((output / 'results.json').read_text())
    trials = {trial['trial']: trial for trial in summary['trials']}
    assert [trials[name]['status'] for name in ('trial-01', 'trial-02', 'trial-03')] == [
        'succeeded', 'succeeded', 'failed']
    # Each log is a trial's merged stdout and stderr, what Katib's collector reads (the pod command ends in
    # `1>file 2>&1`): exactly one fixed-point value per metric, and none at all from the diverged trial.
    for name in ('trial-01', 'trial-02'):
        log = (output / trials[name]['log_file']).read_text()
        assert katib_values(log) == {'accuracy': [trials[name]['accuracy']], 'loss': [trials[name]['loss']]}
        assert 0.3 < trials[name]['accuracy'] <= 1.0 and trials[name]['loss'] > 0
        metric_lines = [line for line in log.splitlines() if re.match(r'(accuracy|loss)=', line)]
        assert len(metric_lines) == 2 and all(re.fullmatch(r'(accuracy|loss)=\d+\.\d{6}', line)
                                              for line in metric_lines)
    assert trials['trial-03']['learning_rate'] == 1e20
    assert trials['trial-03']['error'].startswith('exit code 1: error:')
    assert katib_values((output / trials['trial-03']['log_file']).read_text()) == {'accuracy': [], 'loss': []}
    assert version_folders() == versions_before, 'a trial must not export unless given --export_dir'
    for trial in trials.values():
        assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', trial['started_at']), trial['started_at']
        started, finished = (datetime.datetime.fromisoformat(trial[key]) for key in ('started_at', 'finished_at'))
        assert abs((finished - started).total_seconds() - trial['seconds']) <= 1.5
    # The first two trials ran at the same time.
    assert trials['trial-02']['started_at'] < trials['trial-01']['finished_at']
    with open(output / 'results.csv') as table:
        rows = list(csv.DictReader(table))
    assert [row['trial'] for row in rows] == [trial['trial'] for trial in summary['trials']]
    for name in ('trial-01', 'trial-02'):
        events = [file for _, _, files in os.walk(output / 'tensorboard' / name) for file in files
                  if file.startswith('events.out.tfevents')]
        assert events, f'no TensorBoard events for {name}'
    best = max((trials['trial-01'], trials['trial-02']), key=lambda trial: trial['accuracy'])
    command = result.stdout.strip().splitlines()[-1]
    words = shlex.split(command)
    assert words[0] == 'python3' and os.path.samefile(tmp_path / words[1], os.path.join(REPO, 'mnist_model',
                                                                                        'mnist.py'))
    assert words[2:] == tuning.hyperparameter_flags({name: best[name] for name in tuning.TUNED_NAMES}) + [
        f'--data={small_data_path}']
    assert re.search(r'^\s+1\s+' + best['trial'], result.stdout, re.MULTILINE), 'leaderboard missing the best trial'


def test_tuner_reports_each_running_trial_within_its_first_10_seconds(small_data_path, tmp_path):
    lines = []  # (seconds since the tuner started, line)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, SCRIPT, '--local', '--max_trials', '1', '--parallel', '1', '-o', str(tmp_path / 'tuning'),
         f'--data={small_data_path}', '--space', 'learning_rate=0.05:0.05:0.05', '--space',
         'epoch=20000:20000:1000'] + TINY_SPACE, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic() - started, line.rstrip('\n'))
                                                          for line in process.stdout), daemon=True)
    reader.start()
    try:
        # Wait until the tuner shows the trial's own step count (a long trial: it is stopped once seen).
        while (process.poll() is None and time.monotonic() - started < 120
               and not any(re.search(r'step \d+/20000', line) for _, line in lines)):
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        process.kill()
    reader.join(timeout=10)
    printed = '\n'.join(f'{seconds:5.1f} {line}' for seconds, line in lines)
    assert process.returncode == 130, printed
    start_seconds, start_line = next((seconds, line) for seconds, line in lines if 'started' in line)
    assert start_seconds <= 10 and start_line == (
        'trial-01 started (1 of 1) | num_hidden_layer_1 32 num_hidden_layer_2 16 dropout 1.0 learning_rate 0.05 '
        'epoch 20000'), printed
    progress = [(seconds, re.fullmatch(r'running: trial-01 (starting|step (\d+)/20000 test accuracy (0\.\d{4})) after '
                                       r'\d+ s', line)) for seconds, line in lines if line.startswith('running:')]
    assert progress and all(match for _, match in progress), printed
    # Never silent for much longer than 10 s (the tuner looks every 0.2 s; the machine may be busy).
    times = [seconds for seconds, _ in lines if seconds >= start_seconds]
    assert all(later - earlier <= 15 for earlier, later in zip(times, times[1:])), printed
    # The step and accuracy are the trial's own, from the trainer's progress lines in its log.
    log = (tmp_path / 'tuning' / 'trials' / 'trial-01.log').read_text()
    step, accuracy = progress[-1][1].group(2, 3)
    assert re.search(rf'^step +{step}/20000 .*test loss \S+ accuracy {accuracy} ', log, re.MULTILINE), log


def test_ctrl_c_keeps_finished_trials(small_data_path, tmp_path):
    output = tmp_path / 'tuning'
    process = subprocess.Popen(
        [sys.executable, SCRIPT, '--local', '--max_trials', '3', '--parallel', '1', '-o', str(output),
         f'--data={small_data_path}', '--space', 'learning_rate=0.05:0.1:0.05', '--space', 'epoch=40:60:20']
        + TINY_SPACE, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (output / 'results.json').exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stdout + stderr
    summary = json.loads((output / 'results.json').read_text())
    assert summary['stopped'] == 'interrupted'
    statuses = [trial['status'] for trial in summary['trials']]
    assert statuses[0] == 'succeeded' and set(statuses[1:]) <= {'succeeded', 'stopped'}
    assert 'Retrain with the tuned values' in stdout


def test_stop_at_goal_starts_no_more_trials(small_data_path, tmp_path):
    output = tmp_path / 'tuning'
    result = run_script(['--local', '--max_trials', '3', '--parallel', '1', '-o', str(output), '--goal', '0.1',
                         '--stop_at_goal', f'--data={small_data_path}', '--space', 'learning_rate=0.05:0.1:0.05',
                         '--space', 'epoch=40:60:20'] + TINY_SPACE, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((output / 'results.json').read_text())
    assert [trial['status'] for trial in summary['trials']] == ['succeeded']
    assert summary['stopped'].startswith('goal reached')


def test_unwritable_outputs_are_one_line_and_exit_1(tmp_path, small_data_path):
    a_file = tmp_path / 'file'
    a_file.write_text('')
    for flags in (['--katib-experiment', '-o', str(tmp_path / 'missing' / 'experiment.yaml')],
                  ['--local', '-o', str(a_file), f'--data={small_data_path}']):
        result = run_script(flags, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, result.stderr
