"""What the KFP v1 and v2 pipeline scripts share, without importing either pipeline SDK: the names on the cluster,
the command line, the credentials and the check of the API endpoint.

mnist_pipeline.py (kfp 1.8) and mnist_pipeline_v2.py (kfp 2) live in separate virtual environments, because both
SDKs are the package `kfp`; this module imports neither, so both scripts take their flags, names and authentication
from one definition and keep the same command line.

    python3 mnist_model/mnist_pipeline_v2.py --help     # the flags defined here, plus the v2 script's --image
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request

import mnist

PIPELINE_NAME = 'mnist-image-classification-pipeline'
PIPELINE_DESCRIPTION = 'Pipeline for MNIST Image Classification'
VERSION_NAME = 'mnist-template'
VERSION_DESCRIPTION = 'mnist pipeline template'
EXPERIMENT_NAME = 'MNIST'
SCHEDULE_NAME = 'mnist-pipeline-schedule'
SCHEDULE_DESCRIPTION = 'MNIST Image Classification Model Workflow. 1 Weeks'
SCHEDULE_INTERVAL_SECONDS = 7 * 24 * 60 * 60
# The public copy of the Keras-layout MNIST npz; an air-gapped cluster points data_url at an internal mirror.
DEFAULT_DATA_URL = 'https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz'
# Where the promote step mounts the serving_pvc claim; serving_path is a folder inside it. The default is the folder
# mnist_model/kserve-inferenceservice.yaml serves: the repository checked out as mlops-demo/ on the notebook's volume.
SERVING_MOUNT = '/mnt/serving'
DEFAULT_SERVING_PATH = 'mlops-demo/mnist_model'
# The serving_pvc value of a local run with --serving_dir: any non-empty name turns delivery on, and the local run
# maps SERVING_MOUNT to the folder instead of mounting a claim.
LOCAL_CLAIM = 'local-serving-dir'
TOKEN_FILE = '/var/run/secrets/kubeflow/pipelines/token'


def read_credentials(token_file: str = TOKEN_FILE) -> dict:
    """Session cookie and bearer token for a multi-user Kubeflow, from the environment or the notebook's token file."""
    cookie = os.environ.get('KF_PIPELINES_COOKIE') or None
    token = os.environ.get('KF_PIPELINES_TOKEN') or None
    if token is None and cookie is None and os.path.isfile(token_file):
        with open(token_file, encoding='utf-8') as token_source:
            token = token_source.read().strip() or None
    return {'cookie': cookie, 'token': token}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def check_host(host: str, credentials: dict, api_version: str = 'v1beta1', timeout: float = 10.0) -> dict:
    """Ask the KFP API's healthz endpoint (/apis/<api_version>/healthz) once, so that a wrong URL or refused login is
    one clear error.

    kfp's Client itself retries healthz for 25 s and then raises a long traceback. Returns the healthz answer
    (e.g. {"multi_user": true}); raises ConnectionError or PermissionError with a one-line message.
    """
    healthz_path = f'/apis/{api_version}/healthz'
    request = urllib.request.Request(host.rstrip('/') + healthz_path)
    if credentials['cookie']:
        request.add_header('Cookie', credentials['cookie'])
    if credentials['token']:
        request.add_header('Authorization', 'Bearer ' + credentials['token'])
    login_hint = ('set KF_PIPELINES_COOKIE to your browser\'s Kubeflow session cookie ("authservice_session=..." '
                  'or "oauth2_proxy_kubeflow=...") or KF_PIPELINES_TOKEN to a bearer token')
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise PermissionError(f'{host} refused the credentials (HTTP {error.code}): {login_hint}') from None
        if 300 <= error.code < 400:
            raise PermissionError(f'{host} redirected to a login page (HTTP {error.code}): {login_hint}') from None
        hint = ' (a KFP 1.x backend has no v2 API: use mnist_pipeline.py)' if api_version.startswith('v2') else ''
        raise ConnectionError(f'{host} is not a Kubeflow Pipelines API endpoint (HTTP {error.code} for '
                              f'{healthz_path}){hint}; use e.g. https://<kubeflow host>/pipeline or '
                              f'http://localhost:8080 (kubectl port-forward svc/ml-pipeline-ui)') from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, 'reason', error)
        raise ConnectionError(f'cannot reach Kubeflow Pipelines at {host}: {reason}') from None
    try:
        healthz = json.loads(body)
    except ValueError:
        # Auth proxies in front of Kubeflow answer with an HTML login page instead of the API's JSON.
        raise PermissionError(f'{host} answered with a web page, not the KFP API (a login page?): '
                              f'{login_hint}') from None
    if not isinstance(healthz, dict):
        raise ConnectionError(f'{host} is not a Kubeflow Pipelines API endpoint (its healthz answer is not a JSON '
                              f'object)')
    return healthz


def list_all(list_page, items_attribute: str) -> list:
    """All items of a paginated KFP list call: list_page(page_token) returns one page."""
    items, page_token = [], ''
    while True:
        response = list_page(page_token)
        items.extend(getattr(response, items_attribute) or [])
        page_token = response.next_page_token
        if not page_token:
            return items


def unique_version_name(base_name: str, existing_names) -> str:
    """base_name, or base_name-2, -3, ... : the first one not yet used (KFP rejects duplicate version names)."""
    existing_names = set(existing_names)
    name, number = base_name, 1
    while name in existing_names:
        number += 1
        name = f'{base_name}-{number}'
    return name


def describe_api_error(error) -> str:
    """One line for an error answer of the KFP API (a kfp_server_api.ApiException of either SDK)."""
    message = (error.reason or '').strip()
    try:
        body = json.loads(error.body or '{}')
        message = body.get('error') or body.get('message') or message
    except (TypeError, ValueError, AttributeError):
        pass
    if error.status in (401, 403):
        return (f'Kubeflow Pipelines refused the request (HTTP {error.status}): {message}; '
                f'check KF_PIPELINES_COOKIE / KF_PIPELINES_TOKEN and --namespace')
    return f'Kubeflow Pipelines API error (HTTP {error.status}): {message.splitlines()[0] if message else ""}'


def _http_url(text: str) -> str:
    if not re.match(r'^https?://[^/\s]+', text):
        raise argparse.ArgumentTypeError(f'expected an http:// or https:// URL, got {text!r}')
    return text


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f'expected a number of seconds > 0, got {text!r}')
    return value


def build_parser(description: str, package_path: str, local_runner: str) -> argparse.ArgumentParser:
    """The pipeline scripts' command line: compile (default), --run-local, or the cluster actions."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog='Auth for multi-user Kubeflow: KF_PIPELINES_COOKIE="authservice_session=..." or '
               'KF_PIPELINES_TOKEN=<bearer token>.')
    parser.add_argument('--package', default=package_path,
                        help=f'where to write the compiled pipeline (default: {os.path.basename(package_path)} next '
                             f'to this script)')
    parser.add_argument('--run-local', '--run_local', dest='run_local', action='store_true',
                        help=f'run the pipeline on this machine with {local_runner} (no Docker) on --data; the '
                             f'compiled package it runs is written beside its outputs')
    parser.add_argument('--pipeline_root', '--pipeline-root', default=None,
                        help='folder for the local run\'s outputs, kept (default: a new temporary folder, removed '
                             'when the run ends)')
    parser.add_argument('--keep_pipeline_root', action='store_true',
                        help='with --run-local and no --pipeline_root: keep the temporary folder, for debugging')
    parser.add_argument('--host', type=_http_url,
                        help='Kubeflow Pipelines API URL, e.g. http://localhost:8080 or https://<kubeflow>/pipeline')
    parser.add_argument('--namespace', default=None,
                        help='Kubeflow profile namespace for the experiment, runs and schedule (multi-user)')
    parser.add_argument('--upload', action='store_true',
                        help=f'upload pipeline {PIPELINE_NAME}, or a new version {VERSION_NAME} if it exists')
    parser.add_argument('--run', action='store_true', help=f'start a run in experiment {EXPERIMENT_NAME}')
    parser.add_argument('--wait', action='store_true', help='with --run: wait for the run, print status and metrics')
    parser.add_argument('--timeout', type=_positive_seconds, default=3600.0,
                        help='seconds --wait waits at most (default: %(default)s)')
    parser.add_argument('--schedule', action='store_true',
                        help=f'create the weekly recurring run {SCHEDULE_NAME} unless it exists')
    parser.add_argument('--data_url', default=DEFAULT_DATA_URL,
                        help='data_url parameter of cluster runs and schedules: a Keras-layout MNIST npz '
                             '(default: %(default)s)')
    mnist.add_hyperparameter_arguments(parser)
    delivery = parser.add_argument_group(
        'delivery: the promote step copies the new model into a serving folder, under mnist.py\'s promotion rule')
    delivery.add_argument('--serving_dir', default=None,
                          help='with --run-local: the serving folder to promote into (default: none, the export '
                               'stays a run artifact)')
    delivery.add_argument('--serving_pvc', default='',
                          help='with --run/--schedule: the PersistentVolumeClaim holding the serving folder, e.g. the '
                               'notebook\'s workspace-<notebook> (default: \'\' = deliver nothing)')
    delivery.add_argument('--serving_path', default=DEFAULT_SERVING_PATH,
                          help='with --serving_pvc: the serving folder inside the claim (default: %(default)s, the '
                               'folder mnist_model/kserve-inferenceservice.yaml serves)')
    mnist.add_promotion_arguments(delivery)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, package_path: str):
    """Refuse flag combinations that would be ignored (argparse errors, exit code 2); return (hparams, rule)."""
    cluster_action = args.upload or args.run or args.schedule
    if args.host and not cluster_action:
        parser.error('--host needs at least one of --upload, --run, --schedule')
    if cluster_action and not args.host:
        parser.error('--upload, --run and --schedule need --host')
    if args.wait and not args.run:
        parser.error('--wait needs --run')
    if args.run_local and args.host:
        parser.error('--run-local and --host cannot be combined')
    # Every flag given must take effect: refuse the ones the chosen mode would silently ignore.
    if args.pipeline_root is not None and not args.run_local:
        parser.error('--pipeline_root is for --run-local')
    if args.keep_pipeline_root and (not args.run_local or args.pipeline_root is not None):
        parser.error('--keep_pipeline_root is for --run-local without --pipeline_root (that folder is always kept)')
    if args.namespace is not None and not cluster_action:
        parser.error('--namespace is for --upload, --run and --schedule')
    if args.timeout != parser.get_default('timeout') and not args.wait:
        parser.error('--timeout is for --wait')
    if args.package != package_path and (args.run_local or cluster_action):
        parser.error('--package is for compiling only (--upload compiles a fresh copy itself)')
    if args.data != mnist.DEFAULT_DATA and not args.run_local:
        parser.error('--data is for --run-local; cluster runs read --data_url (a URL the cluster can reach)')
    if args.data_url != DEFAULT_DATA_URL and not (args.run or args.schedule):
        parser.error('--data_url is for --run and --schedule; --run-local reads --data')
    hparams = mnist.hyperparameters_from(args)
    if hparams != mnist.HYPERPARAMETER_DEFAULTS and not (args.run_local or args.run or args.schedule):
        parser.error('hyperparameters are for --run-local, --run and --schedule (the compiled pipeline keeps '
                     'the defaults; its parameters are set per run)')
    if args.serving_dir is not None and not args.run_local:
        parser.error('--serving_dir is for --run-local; cluster runs deliver to --serving_pvc')
    if (args.serving_pvc or args.serving_path != DEFAULT_SERVING_PATH) and not (args.run or args.schedule):
        parser.error('--serving_pvc and --serving_path are for --run and --schedule; --run-local delivers to '
                     '--serving_dir')
    if args.serving_path != DEFAULT_SERVING_PATH and not args.serving_pvc:
        parser.error('--serving_path needs --serving_pvc (the claim it is a folder of)')
    rule = mnist.promotion_rule_from(args)
    if rule != mnist.PROMOTION_DEFAULTS and not (args.serving_dir or args.serving_pvc):
        parser.error('--min_accuracy, --min_improvement, --max_digit_drop, --min_test_examples and --force_export '
                     'apply to a delivery: give --serving_dir '
                     '(--run-local) or --serving_pvc (--run, --schedule)')
    return hparams, rule


def cluster_actions(args: argparse.Namespace) -> set:
    """The cluster actions the flags ask for: a subset of {'upload', 'run', 'schedule', 'wait'}."""
    return {name for name in ('upload', 'run', 'schedule', 'wait') if getattr(args, name)}


def run_parameters(args: argparse.Namespace, hparams: dict, rule: dict) -> dict:
    """The pipeline parameters of a cluster run or schedule."""
    return dict(hparams, data_url=args.data_url, serving_pvc=args.serving_pvc, serving_path=args.serving_path, **rule)


# Where .ci/run builds the second virtual environment (requirements-kfp2.txt), whose python runs mnist_pipeline_v2.py.
KFP2_VENV = os.path.join('~', '.cache', 'mnist-demo-venv-kfp2')


def find_kfp2_python():
    """The python of the kfp 2 environment: $MNIST_KFP2_PYTHON, else .ci/run's ~/.cache/mnist-demo-venv-kfp2; None
    if neither exists."""
    configured = os.environ.get('MNIST_KFP2_PYTHON')
    candidate = configured or os.path.join(os.path.expanduser(KFP2_VENV), 'bin', 'python')
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


def report_errors(script: str, host: str, action) -> int:
    """Run action() and return its exit code; an error of the KFP API, a lost connection or a user mistake is one
    line on stderr and exit code 1."""
    # The REST client of whichever pipeline SDK this environment has: kfp 1.8's and kfp 2's are both kfp_server_api.
    import kfp_server_api
    import urllib3

    try:
        return action()
    except kfp_server_api.ApiException as error:
        message = describe_api_error(error)
    except urllib3.exceptions.HTTPError as error:
        message = f'lost the connection to {host}: {error}'
    except (OSError, ValueError, LookupError, RuntimeError, TimeoutError) as error:
        message = str(error)
    print(f'{script}: error: {message}', file=sys.stderr)
    return 1


def run_local_and_report(run_local, data: str, hparams: dict, pipeline_root: str, serving_dir: str, rule: dict,
                         keep_pipeline_root: bool, prefix: str) -> int:
    """Run a pipeline script's run_local and print what it did: its outputs, the served version and the metric lines.
    Without pipeline_root the run goes to a new temporary folder, removed at the end unless keep_pipeline_root."""
    temporary = pipeline_root is None and not keep_pipeline_root
    pipeline_root = pipeline_root or tempfile.mkdtemp(prefix=prefix)
    data = os.path.abspath(data) if '://' not in data else data
    started = time.monotonic()
    try:
        result = run_local(data, hparams, pipeline_root, serving_dir=serving_dir, rule=rule)
    finally:
        if temporary:
            shutil.rmtree(pipeline_root, ignore_errors=True)
    print(f'Local run {result["run_id"]} succeeded in {time.monotonic() - started:.1f} s of wall time.')
    if temporary:
        print(f'Outputs were in the temporary folder {pipeline_root}, removed now (--keep_pipeline_root keeps it).')
    else:
        print(f'Outputs, kept in {pipeline_root}:')
        for name, path in result['outputs'].items():
            print(f'  {name:24s}{path}')
    if result['model_version']:
        served = os.path.join(os.path.abspath(serving_dir), str(result['model_version']))
        print(f'Served as {served}.' if temporary else f'  {"served version":24s}{served}')
    print(mnist.format_metrics(result['accuracy'], result['loss']))
    return 0
