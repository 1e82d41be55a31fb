"""Tests of kubeflow/: the Profile, the PodDefault and the notebook's volume claim and Notebook, checked against the
rules the Kubernetes API server, Kubeflow's CRD schemas and its notebook controller apply, and the commands in their
headers and in docs/kubeflow.md run as written (up to kubectl).

    python3 -m pytest -q tests/test_kubeflow_manifests.py
"""
import copy
import os
import re
import subprocess

import pytest
import yaml

import mnist_hyper_tuning
import mnist_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFESTS = ('kubeflow/profile.yaml', 'kubeflow/poddefault-access-ml-pipeline.yaml', 'kubeflow/notebook.yaml')
DOCS = os.path.join(REPO, 'docs', 'kubeflow.md')
NOTEBOOK_NAME = 'mnist-image-classification-notebook'

# Kubernetes' name rules (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = r'[a-z0-9]([-a-z0-9]*[a-z0-9])?'
DNS1123_SUBDOMAIN = rf'{DNS1123_LABEL}(\.{DNS1123_LABEL})*'
DNS1035_LABEL = r'[a-z]([-a-z0-9]*[a-z0-9])?'
QUALIFIED_NAME_PART = r'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]'
# A pinned image: registry/path:tag with a tag that is not `latest` (a digest would do too).
PINNED_IMAGE = re.compile(r'[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+(:[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})')
EXPECTED_KINDS = {('kubeflow.org/v1', 'Profile'), ('kubeflow.org/v1alpha1', 'PodDefault'),
                  ('v1', 'PersistentVolumeClaim'), ('kubeflow.org/v1', 'Notebook')}


def load_documents(paths=MANIFESTS):
    return [document for path in paths for document in yaml.safe_load_all(open(os.path.join(REPO, path)))]


def is_name(text, pattern, longest):
    return isinstance(text, str) and len(text) <= longest and re.fullmatch(pattern, text) is not None


def is_qualified_key(key):
    """A label or annotation key: an optional DNS subdomain prefix and '/', then a name of at most 63 characters."""
    prefix, _, name = key.rpartition('/')
    return (not prefix or is_name(prefix, DNS1123_SUBDOMAIN, 253)) and is_name(name, QUALIFIED_NAME_PART, 63)


def quantity(text, units):
    """A Kubernetes resource quantity ('500m', '2', '1.5Gi') in base units, for comparing requests and limits."""
    match = re.fullmatch(r'([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)', str(text))
    assert match and match.group(2) in units, f'not a quantity: {text!r}'
    return float(match.group(1)) * units[match.group(2)]


CPU_UNITS = {'': 1.0, 'm': 0.001}
MEMORY_UNITS = {'': 1, 'k': 1e3, 'M': 1e6, 'G': 1e9, 'Ki': 2 ** 10, 'Mi': 2 ** 20, 'Gi': 2 ** 30, 'Ti': 2 ** 40}


def metadata_errors(document):
    """What the API server refuses in any object's metadata."""
    errors = []
    metadata = document.get('metadata') or {}
    if not document.get('apiVersion') or not document.get('kind') or not metadata.get('name'):
        errors.append('apiVersion, kind and metadata.name are required')
    for label, value in (metadata.get('labels') or {}).items():
        if not is_qualified_key(label) or not isinstance(value, str) or (
                value and not is_name(value, QUALIFIED_NAME_PART, 63)):
            errors.append(f'label {label}: {value!r} is not a valid label (values are strings)')
    for key, value in (metadata.get('annotations') or {}).items():
        if not is_qualified_key(key) or not isinstance(value, str):
            errors.append(f'annotation {key}: {value!r} is not a valid annotation (values are strings)')
    return errors


def pod_spec_errors(pod_spec, notebook_name):
    """The PodSpec rules the API server applies to the notebook's pod, and what the notebook controller expects."""
    errors = []
    containers = pod_spec.get('containers') or []
    if not containers:
        return ['spec.template.spec.containers is required']
    # The controller sets the port and NB_PREFIX on the first container and reports the state of the one named like
    # the Notebook; the dashboard names it so.
    if containers[0].get('name') != notebook_name:
        errors.append('the first container must be named like the Notebook')
    volumes = {volume.get('name'): volume for volume in pod_spec.get('volumes') or []}
    if len(volumes) != len(pod_spec.get('volumes') or []):
        errors.append('volume names repeat')
    for name in volumes:
        if not is_name(name, DNS1123_LABEL, 63):
            errors.append(f'volume name {name!r} is not a DNS-1123 label')
    for container in containers:
        if not is_name(container.get('name'), DNS1123_LABEL, 63):
            errors.append(f'container name {container.get("name")!r} is not a DNS-1123 label')
        image = container.get('image', '')
        if image.endswith(':latest') or not re.search(r':[\w][\w.-]*$|@sha256:', image):
            errors.append(f'image {image!r} is not pinned to a tag')
        mounts = container.get('volumeMounts') or []
        if len({mount.get('mountPath') for mount in mounts}) != len(mounts):
            errors.append('mount paths repeat')
        for mount in mounts:
            if mount.get('name') not in volumes:
                errors.append(f'volume mount {mount.get("name")!r} names no volume')
        resources = container.get('resources') or {}
        for resource, units in (('cpu', CPU_UNITS), ('memory', MEMORY_UNITS)):
            request = (resources.get('requests') or {}).get(resource)
            limit = (resources.get('limits') or {}).get(resource)
            if request is None or limit is None:
                errors.append(f'{resource} request and limit are required')
            elif quantity(request, units) > quantity(limit, units):
                errors.append(f'{resource} request {request} exceeds its limit {limit}')
    return errors


def cluster_errors(documents):
    """The reasons a cluster would refuse the manifests or the notebook would not come up as meant (empty = fine)."""
    errors = [error for document in documents for error in metadata_errors(document)]
    by_kind = {}
    for document in documents:
        if (document.get('apiVersion'), document.get('kind')) not in EXPECTED_KINDS:
            errors.append(f'unexpected {document.get("apiVersion")} {document.get("kind")}')
        by_kind.setdefault(document.get('kind'), []).append(document)
    if sorted(by_kind) != ['Notebook', 'PersistentVolumeClaim', 'PodDefault', 'Profile'] or any(
            len(found) != 1 for found in by_kind.values()):
        return errors + ['expected one Profile, PodDefault, PersistentVolumeClaim and Notebook']
    [profile], [pod_default], [claim], [notebook] = (by_kind[kind] for kind in (
        'Profile', 'PodDefault', 'PersistentVolumeClaim', 'Notebook'))

    # The Profile is cluster-wide and names the namespace the others live in.
    namespace = profile['metadata']['name']
    if not is_name(namespace, DNS1123_LABEL, 63) or 'namespace' in profile['metadata']:
        errors.append('the Profile name must be a DNS-1123 label, without a namespace')
    owner = (profile.get('spec') or {}).get('owner') or {}
    if owner.get('kind') not in ('User', 'Group', 'ServiceAccount') or not owner.get('name'):
        errors.append('spec.owner needs kind (User) and name')
    for document in (pod_default, claim, notebook):
        if document['metadata'].get('namespace') != namespace:
            errors.append(f'{document["kind"]} is not in the profile namespace {namespace}')

    if not is_name(claim['metadata']['name'], DNS1123_SUBDOMAIN, 253):
        errors.append('the claim name must be a DNS-1123 subdomain')
    claim_spec = claim.get('spec') or {}
    if not claim_spec.get('accessModes') or not set(claim_spec['accessModes']) <= {
            'ReadWriteOnce', 'ReadOnlyMany', 'ReadWriteMany', 'ReadWriteOncePod'}:
        errors.append('the claim needs valid accessModes')
    if not ((claim_spec.get('resources') or {}).get('requests') or {}).get('storage'):
        errors.append('the claim needs resources.requests.storage')

    # The notebook's name becomes a StatefulSet, its pod <name>-0 and a Service (a DNS-1035 label); the StatefulSet's
    # controller-revision-hash label adds about 11 characters to it, and a label value holds at most 63.
    name = notebook['metadata']['name']
    if not is_name(name, DNS1035_LABEL, 52):
        errors.append('the Notebook name must be a DNS-1035 label of at most 52 characters')
    pod_spec = ((notebook.get('spec') or {}).get('template') or {}).get('spec') or {}
    errors += pod_spec_errors(pod_spec, name)
    volumes = {volume['name']: volume for volume in pod_spec.get('volumes') or [] if 'name' in volume}
    home = [mount for mount in (pod_spec.get('containers') or [{}])[0].get('volumeMounts') or []
            if mount.get('mountPath') == '/home/jovyan']
    claim_name = (volumes.get(home[0].get('name'), {}).get('persistentVolumeClaim') or {}).get('claimName') if home \
        else None
    if claim_name != claim['metadata']['name']:
        errors.append('/home/jovyan must be mounted from the claim in the manifests')

    selector = ((pod_default.get('spec') or {}).get('selector') or {}).get('matchLabels') or {}
    labels = notebook['metadata'].get('labels') or {}
    if not selector or any(labels.get(key) != value for key, value in selector.items()):
        errors.append("the PodDefault's selector does not match the notebook's labels")
    pod_default_volumes = {volume.get('name') for volume in pod_default['spec'].get('volumes') or []}
    if any(mount.get('name') not in pod_default_volumes for mount in pod_default['spec'].get('volumeMounts') or []):
        errors.append("a PodDefault volume mount names none of its volumes")
    return errors


def header_commands(path):
    """The shell commands in a manifest's header comment (the lines indented as commands)."""
    commands = []
    with open(os.path.join(REPO, path)) as manifest:
        for line in manifest:
            if not line.startswith('#'):
                break
            if line.startswith('#   '):
                commands.append(line[1:].strip())
    return commands


def test_manifests_pass_the_cluster_rules():
    assert cluster_errors(load_documents()) == []


@pytest.mark.parametrize('change, expected', [
    (lambda kinds: kinds['Notebook']['metadata']['labels'].update({'access-ml-pipeline': True}), 'label'),
    (lambda kinds: kinds['Notebook']['metadata'].update(name='MNIST_notebook'), 'DNS-1035'),
    (lambda kinds: kinds['Profile']['metadata'].update(name='MNIST 손글씨 이미지 분류 프로젝트'), 'DNS-1123 label'),
    (lambda kinds: kinds['Notebook']['spec']['template']['spec']['containers'][0].update(name='notebook'),
     'named like the Notebook'),
    (lambda kinds: kinds['Notebook']['spec']['template']['spec']['containers'][0]['volumeMounts'][0].update(
        name='workspace'), 'names no volume'),
    (lambda kinds: kinds['Notebook']['spec']['template']['spec']['volumes'][0]['persistentVolumeClaim'].update(
        claimName='workspace-mnist'), 'mounted from the claim'),
    (lambda kinds: kinds['PodDefault']['spec']['selector']['matchLabels'].update({'access-ml-pipeline': 'yes'}),
     'selector'),
    (lambda kinds: kinds['Notebook']['spec']['template']['spec']['containers'][0].update(
        image='registry.example.com/jupyter/mnist-tensorflow-cpu:latest'), 'not pinned'),
    (lambda kinds: kinds['Notebook']['spec']['template']['spec']['containers'][0]['resources']['limits'].update(
        memory='1Gi'), 'exceeds its limit'),
    (lambda kinds: kinds['PersistentVolumeClaim']['metadata'].update(namespace='kubeflow-user-example-com'),
     'not in the profile namespace'),
    (lambda kinds: kinds['Profile']['spec']['owner'].pop('kind'), 'spec.owner'),
])
def test_rule_check_catches_what_a_cluster_refuses(change, expected):
    documents = copy.deepcopy(load_documents())
    change({document['kind']: document for document in documents})
    assert any(expected in error for error in cluster_errors(documents)), cluster_errors(documents)


def test_manifests_state_the_demo_project_and_notebook():
    kinds = {document['kind']: document for document in load_documents()}
    assert kinds['Profile']['metadata']['name'] == 'mnist-project'
    assert kinds['Profile']['metadata']['annotations'] == {
        'display-name': 'MNIST 손글씨 이미지 분류 프로젝트', 'description': 'Faster RCNN 기반 Image Classification 모델'}
    notebook = kinds['Notebook']
    assert notebook['metadata']['name'] == NOTEBOOK_NAME and notebook['metadata']['annotations']['description']
    assert notebook['metadata']['labels']['access-ml-pipeline'] == 'true'
    # The same dev image (and registry placeholder) as the Katib trials.
    assert notebook['spec']['template']['spec']['containers'][0]['image'] == mnist_hyper_tuning.DEFAULT_IMAGE
    assert kinds['PersistentVolumeClaim']['spec']['resources']['requests']['storage'] == '3Gi'
    # The token lands where mnist_pipeline.py (and kfp.Client) read it.
    pod_default = kinds['PodDefault']['spec']
    token_source = pod_default['volumes'][0]['projected']['sources'][0]['serviceAccountToken']
    assert os.path.join(pod_default['volumeMounts'][0]['mountPath'], token_source['path']) == mnist_pipeline.TOKEN_FILE
    assert {variable['name']: variable['value'] for variable in pod_default['env']} == {
        'KF_PIPELINES_SA_TOKEN_PATH': mnist_pipeline.TOKEN_FILE}


def test_header_commands_fill_every_placeholder_and_are_documented():
    with open(DOCS) as docs_file:
        docs = docs_file.read()
    for path in MANIFESTS:
        commands = header_commands(path)
        assert any(command.startswith('kubectl apply') or '| kubectl apply -f -' in command
                   for command in commands), f'{path}: no kubectl apply command in the header'
        for command in commands:
            assert command in docs, f'docs/kubeflow.md does not show `{command}`'
    filled = []
    for path in ('kubeflow/profile.yaml', 'kubeflow/notebook.yaml'):
        [command] = [command for command in header_commands(path) if command.endswith('| kubectl apply -f -')]
        # Run the command as documented, up to kubectl, from the repository's top folder.
        process = subprocess.run(command.removesuffix('| kubectl apply -f -'), shell=True, cwd=REPO,
                                 capture_output=True, text=True, timeout=30)
        assert process.returncode == 0, process.stderr
        filled += list(yaml.safe_load_all(process.stdout))
    documents = filled + load_documents(['kubeflow/poddefault-access-ml-pipeline.yaml'])
    assert cluster_errors(documents) == []
    assert '<' not in yaml.safe_dump(documents, allow_unicode=True)
    kinds = {document['kind']: document for document in documents}
    assert kinds['Profile']['spec']['owner'] == {'kind': 'User', 'name': 'you@example.com'}
    assert PINNED_IMAGE.fullmatch(kinds['Notebook']['spec']['template']['spec']['containers'][0]['image'])


# ------------------------------------------------------------------------- the drift monitor's manifests (issue 25)
# mnist_model/drift-monitor.yaml (Deployment, Service), drift-prometheus.yaml (prometheus-operator's ServiceMonitor and
# PrometheusRule) and the logger block of kserve-inferenceservice.yaml, checked against the fields and rules of
# apps/v1, v1, monitoring.coreos.com/v1 and KServe's v1beta1 LoggerSpec, and against what drift_monitor.py serves.
DRIFT_MONITOR = 'mnist_model/drift-monitor.yaml'
DRIFT_PROMETHEUS = 'mnist_model/drift-prometheus.yaml'
# prometheus-operator's duration pattern (monitoring.coreos.com/v1 Duration).
PROMETHEUS_DURATION = re.compile(r'^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?'
                                 r'(([0-9]+)ms)?)$')
# KServe v1beta1 LoggerSpec: url, mode (enum), metadataHeaders, metadataAnnotations.
LOGGER_FIELDS = {'url', 'mode', 'metadataHeaders', 'metadataAnnotations'}


def filled_documents(path):
    """The manifest's documents after its header's sed command, run as documented (up to kubectl)."""
    [command] = [command for command in header_commands(path) if '| kubectl apply' in command]
    assert command in open(os.path.join(REPO, 'docs', 'monitoring.md')).read(), f'docs/monitoring.md lacks {command}'
    process = subprocess.run(command.split('| kubectl apply')[0], shell=True, cwd=REPO, capture_output=True,
                             text=True, timeout=30)
    assert process.returncode == 0, process.stderr
    assert '<' not in process.stdout.replace('{{', '').split('annotations:')[0], 'a placeholder is left'
    return list(yaml.safe_load_all(process.stdout))


def drift_monitor_errors(documents):
    """What the API server refuses in the Deployment and Service, or what would leave them unconnected."""
    import drift_monitor

    errors = [error for document in documents for error in metadata_errors(document)]
    kinds = {(document['apiVersion'], document['kind']): document for document in documents}
    if set(kinds) != {('apps/v1', 'Deployment'), ('v1', 'Service')}:
        return errors + [f'expected a Deployment and a Service, got {sorted(kinds)}']
    deployment, service = kinds['apps/v1', 'Deployment'], kinds['v1', 'Service']
    template = deployment['spec']['template']
    selector = deployment['spec']['selector']['matchLabels']
    pod_labels = template['metadata']['labels']
    if any(pod_labels.get(key) != value for key, value in selector.items()):
        errors.append('the Deployment selector does not match its pod template')
    pod_spec = template['spec']
    errors += pod_spec_errors(pod_spec, pod_spec['containers'][0]['name'])
    [container] = pod_spec['containers']
    ports = {port['name']: port['containerPort'] for port in container.get('ports', [])}
    for probe in ('readinessProbe', 'livenessProbe'):
        if container[probe]['httpGet']['port'] not in ports or container[probe]['httpGet']['path'] != '/healthz':
            errors.append(f'{probe} does not ask the monitor\'s /healthz on a named port')
    try:
        flags = drift_monitor.make_parser().parse_args(container['args'])
    except SystemExit:
        return errors + [f'drift_monitor.py refuses the args {container["args"]}']
    if flags.port not in ports.values() or flags.host != '0.0.0.0':
        errors.append('the monitor does not listen on the container port on every interface')
    mounts = {mount['mountPath']: mount for mount in container['volumeMounts']}
    if flags.model_base_path not in mounts:
        errors.append('--model_base_path is not a mounted volume')
    if any(pod_labels.get(key) != value for key, value in service['spec']['selector'].items()):
        errors.append('the Service selects no pod of the Deployment')
    for port in service['spec']['ports']:
        if port['targetPort'] not in ports:
            errors.append(f'Service port {port["name"]} targets no container port')
    return errors


def test_drift_monitor_manifest_passes_the_cluster_rules():
    documents = filled_documents(DRIFT_MONITOR)
    assert drift_monitor_errors(documents) == []
    deployment = documents[0]
    assert deployment['spec']['replicas'] == 1      # the windows live in one process's memory
    assert PINNED_IMAGE.fullmatch(deployment['spec']['template']['spec']['containers'][0]['image'])
    # The same serving folder as the InferenceService's storageUri, read-only.
    isvc = yaml.safe_load(open(os.path.join(REPO, 'mnist_model', 'kserve-inferenceservice.yaml')))
    claim, folder = isvc['spec']['predictor']['tensorflow']['storageUri'].removeprefix('pvc://').split('/', 1)
    volume = deployment['spec']['template']['spec']['volumes'][0]['persistentVolumeClaim']
    mount = deployment['spec']['template']['spec']['containers'][0]['volumeMounts'][0]
    assert claim == '<notebook-pvc>' and volume['readOnly'] and mount['readOnly'] and mount['subPath'] == folder


@pytest.mark.parametrize('change, expected', [
    (lambda kinds: kinds['Service']['spec']['selector'].update(app='mnist-monitor'), 'selects no pod'),
    (lambda kinds: kinds['Deployment']['spec']['template']['spec']['containers'][0].update(
        args=['--port=8080', '--window=5']), 'refuses the args'),
    (lambda kinds: kinds['Deployment']['spec']['template']['spec']['containers'][0].update(
        args=['--host=0.0.0.0', '--port=9090', '--model_base_path=/mnt/models']), 'container port'),
    (lambda kinds: kinds['Service']['spec']['ports'][0].update(targetPort='metrics'), 'targets no container port'),
])
def test_drift_monitor_check_catches_what_would_not_work(change, expected):
    documents = filled_documents(DRIFT_MONITOR)
    change({document['kind']: document for document in documents})
    assert any(expected in error for error in drift_monitor_errors(documents)), drift_monitor_errors(documents)


def prometheus_errors(documents, monitor_documents, exported):
    """The monitoring.coreos.com/v1 schema of the ServiceMonitor and PrometheusRule (required fields, types,
    durations) and whether they reach the monitor's Service and name metrics it exports."""
    errors = [error for document in documents for error in metadata_errors(document)]
    kinds = {document['kind']: document for document in documents}
    if set(kinds) != {'ServiceMonitor', 'PrometheusRule'} or any(
            document['apiVersion'] != 'monitoring.coreos.com/v1' for document in documents):
        return errors + ['expected a monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule']
    service = next(document for document in monitor_documents if document['kind'] == 'Service')
    monitor = kinds['ServiceMonitor']['spec']
    if any(service['metadata']['labels'].get(key) != value for key, value in monitor['selector']['matchLabels'].items()):
        errors.append('the ServiceMonitor selects no label of the monitor\'s Service')
    for endpoint in monitor['endpoints']:
        if endpoint['port'] not in {port['name'] for port in service['spec']['ports']} or endpoint['path'] != '/metrics':
            errors.append('a ServiceMonitor endpoint is not the Service\'s port and /metrics')
        if not PROMETHEUS_DURATION.match(endpoint.get('interval', '')):
            errors.append(f'interval {endpoint.get("interval")!r} is not a duration')
    groups = kinds['PrometheusRule']['spec']['groups']
    if len({group['name'] for group in groups}) != len(groups):
        errors.append('rule group names repeat')
    for rule in (rule for group in groups for rule in group['rules']):
        if ('alert' in rule) == ('record' in rule) or not isinstance(rule.get('expr'), str) or not rule['expr']:
            errors.append(f'rule {rule.get("alert")}: exactly one of alert and record, and an expr, are required')
            continue
        if not PROMETHEUS_DURATION.match(str(rule.get('for', '0'))):
            errors.append(f'rule {rule["alert"]}: for {rule["for"]!r} is not a duration')
        for field in ('labels', 'annotations'):
            if any(not isinstance(key, str) or not isinstance(value, str) for key, value in rule.get(field, {}).items()):
                errors.append(f'rule {rule.get("alert")}: {field} must map strings to strings')
        for name in re.findall(r'\b(model_drift_\w+)\{', rule['expr']):
            if name not in exported:
                errors.append(f'rule {rule.get("alert")}: the monitor exports no {name}')
    return errors


def exported_metric_names():
    """The sample names drift_monitor.py's /metrics carries (its drift collector, asked in this process)."""
    import serving_drift

    watcher = serving_drift.DriftWatcher('mnist-model-server', loaded_versions=set)
    try:
        return {sample.name for family in watcher.collector().collect() for sample in family.samples} | {
            'model_drift_score', 'model_drift_alert'}
    finally:
        watcher.close()


def test_prometheus_rule_and_service_monitor_match_the_crd_schema_and_the_monitor():
    documents = filled_documents(DRIFT_PROMETHEUS)
    exported = exported_metric_names()
    assert 'model_drift_dropped_inputs_total' in exported
    assert prometheus_errors(documents, filled_documents(DRIFT_MONITOR), exported) == []
    rule = documents[1]['spec']['groups'][0]['rules'][0]
    assert rule['alert'] == 'MnistModelDrift' and 'model_drift_alert{model_name="mnist-model-server"}' in rule['expr']
    broken = copy.deepcopy(documents)
    broken[1]['spec']['groups'][0]['rules'][0].update({'for': '5 minutes', 'expr': 'model_drift_alarm{} == 1'})
    errors = prometheus_errors(broken, filled_documents(DRIFT_MONITOR), exported)
    assert any('not a duration' in error for error in errors) and any('no model_drift_alarm' in error for error in errors)


def test_kserve_logger_block_once_uncommented_posts_to_the_drift_monitor_service():
    with open(os.path.join(REPO, 'mnist_model', 'kserve-inferenceservice.yaml')) as manifest_file:
        text = manifest_file.read()
    uncommented = re.sub(r'^(\s*)# (logger:|  mode:|  url:)', r'\1\2', text, flags=re.M)
    logger = yaml.safe_load(uncommented)['spec']['predictor']['logger']
    assert set(logger) <= LOGGER_FIELDS and logger['mode'] in ('all', 'request', 'response')
    assert logger['mode'] == 'all'       # the monitor needs both halves of every predict
    service = next(document for document in filled_documents(DRIFT_MONITOR) if document['kind'] == 'Service')
    port = service['spec']['ports'][0]['port']
    assert logger['url'] == f'http://{service["metadata"]["name"]}.mnist-project.svc.cluster.local' \
                            f'{"" if port == 80 else f":{port}"}/'
