"""Promote an exported model into a serving folder only if it is at least as good as the one served, and retire a
served version to roll back.

A serving folder holds integer version folders (1/, 2/, ...) that TF Serving, KServe and the local model server poll;
they serve the largest (serving_folder.py says which folders count). promote() is the last step of every path that
makes a model -- mnist.py, a Katib trial with --export_dir, the KFP pipelines (whose promote component embeds this
module's source and serving_folder.py's verbatim) -- and applies one rule, TFX-Evaluator style: the candidate's test
accuracy must reach a floor (min_accuracy) and the served version's accuracy plus min_improvement (a tie promotes);
force_export overrides. retire() takes a version out of service.

    python3 mnist_model/mnist.py --min_accuracy 0.97      # train, and serve the result only if it is good enough
    python3 mnist_model/mnist.py --retire 3               # roll back: version 3 out, the previous one served again
"""
from __future__ import annotations

import collections
import datetime
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, NamedTuple

import serving_folder

if TYPE_CHECKING:
    # The kfp annotations stay strings at run time (from __future__ import annotations), resolved by the pipeline
    # scripts; promotion itself runs without kfp.
    from kfp.components import InputPath, OutputPath

# The promotion rule's settings: a floor, the margin over the served version, and the override.
PROMOTION_DEFAULTS = {'min_accuracy': 0.0, 'min_improvement': 0.0, 'force_export': False}
# Accuracies are counts over the test set; the tolerance keeps a float sum such as 0.97 + 0.01 from refusing a tie.
TOLERANCE = 1e-9
PromoteOutputs = collections.namedtuple('PromoteOutputs', ['promoted', 'model_version', 'decision'])


class Progress:
    """How far a promotion got, for the line that says what happened when it is interrupted: the staging folder being
    written, and the version once it is renamed into place."""

    def __init__(self, serving_dir):
        self.serving_dir = serving_dir
        self.staging_dir = None
        self.release = None
        self.version = 0
        self.version_dir = ''
        self.promoted = False

    def settle(self):
        """After an error: the version is either whole in place or not there at all; say which."""
        self.promoted = self.promoted or bool(self.version_dir and os.path.isdir(self.version_dir)
                                              and self.staging_dir and not os.path.exists(self.staging_dir))

    def stopped_line(self, error):
        """For Ctrl-C or SIGTERM: the stderr line saying whether the version was promoted; None for other errors."""
        if not isinstance(error, (KeyboardInterrupt, SystemExit)):
            return None
        state = (f'version {self.version} was promoted: it is {self.version_dir}' if self.promoted else
                 f'nothing was promoted; {self.serving_dir} is as it was')
        return f'promote: {"interrupted" if isinstance(error, KeyboardInterrupt) else "terminated"}; {state}'

    def clean_up(self):
        if self.staging_dir is not None and os.path.exists(self.staging_dir):
            shutil.rmtree(self.staging_dir, ignore_errors=True)
        if self.release is not None:
            self.release()
            self.release = None


def terminate(signal_number, frame):
    # SIGTERM would end the process where it stands, leaving the staging folder behind; ended this way, the promotion
    # cleans up and says what it did, as after Ctrl-C.
    raise SystemExit(128 + signal_number)


def catch_sigterm():
    """Turn SIGTERM (a pod being stopped) into SystemExit until the returned function is called. Signal handlers can
    only be set in the main thread (a notebook may promote from another one); elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = [signal.signal(signal.SIGTERM, terminate)]

    def restore():
        while previous:
            signal.signal(signal.SIGTERM, previous.pop() or signal.SIG_DFL)  # None: a handler set outside Python
    return restore


def write_failure(serving_dir, error):
    """One line for a failed write into serving_dir: the folder, the cause and that nothing was added."""
    cause, where = str(error), ''
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        # copytree gathers a (source, destination, "[Errno N] reason: 'source' -> 'destination'") per file.
        _, where, reason = error.args[0][0]
        cause = reason.split('] ', 1)[-1].split(': ', 1)[0]
    elif isinstance(error, OSError) and error.strerror:
        cause, where = error.strerror, error.filename or ''
    return OSError(f'cannot promote into {serving_dir}: {cause}' + (f' ({where})' if where else '')
                   + '; nothing was added to it')


def check_rule(min_accuracy, min_improvement):
    if not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f'min_accuracy must be a test accuracy in [0, 1], got {min_accuracy}')
    if not min_improvement >= 0.0:
        raise ValueError(f'min_improvement must be >= 0, got {min_improvement}')


def read_run_record(model_dir):
    with open(os.path.join(model_dir, 'assets.extra', 'run.json')) as file:
        return json.load(file)


def served_now(serving_dir, warned):
    """The version a server would serve now and its recorded test accuracy (None: unknown). A warning about an
    unreadable record is printed once per promotion (warned holds those printed), though the rule looks twice."""
    served_version = max(serving_folder.versions(serving_dir), default=None)
    if served_version is None:
        return None, None
    record_path = os.path.join(serving_dir, str(served_version), 'assets.extra', 'run.json')
    try:
        with open(record_path) as file:
            served_accuracy = float(json.load(file)['accuracy'])
        if not 0.0 <= served_accuracy <= 1.0:
            raise ValueError(f'accuracy {served_accuracy} is not in [0, 1]')
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = 'it has none' if isinstance(error, FileNotFoundError) else f'{type(error).__name__}: {error}'
        warning = (f'warning: cannot read the test accuracy of served version {served_version} from {record_path} '
                   f'({reason}); treating it as unknown')
        if warning not in warned:
            warned.add(warning)
            print(warning, file=sys.stderr, flush=True)
        return served_version, None
    return served_version, served_accuracy


def describe_baseline(served_version, served_accuracy):
    if served_version is None:
        return ''
    if served_accuracy is None:
        return f'version {served_version} (accuracy unknown)'
    return f'{served_accuracy:.4f} of version {served_version}'


def refusal_against(accuracy, served_version, served_accuracy, rule):
    """Why the rule declines a candidate of this accuracy against that served version ('' if it promotes)."""
    if rule['force_export']:
        return ''
    if not math.isfinite(accuracy):
        return f'its test accuracy {accuracy} is not a number'
    if accuracy + TOLERANCE < rule['min_accuracy']:
        return f'its test accuracy {accuracy:.4f} is below the floor --min_accuracy {rule["min_accuracy"]:.4f}'
    min_improvement = rule['min_improvement']
    if served_accuracy is not None and accuracy + TOLERANCE < served_accuracy + min_improvement:
        needed = f' + --min_improvement {min_improvement:.4f}' if min_improvement else ''
        return (f'its test accuracy {accuracy:.4f} is below {describe_baseline(served_version, served_accuracy)}'
                f'{needed}, which stays in service')
    return ''


def make_readable(staging_dir, serving_dir):
    """Give the staged version the permissions and owner of a served one."""
    owner = os.stat(serving_dir)
    for directory, _, files in os.walk(staging_dir):
        # mkdtemp makes the folder private; a server running as another user must be able to read it.
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
        if os.geteuid() == 0 and owner.st_uid != 0:
            # A pipeline step runs as root; the notebook user who owns the folder must be able to retire it.
            for path in [directory] + [os.path.join(directory, name) for name in files]:
                os.chown(path, owner.st_uid, owner.st_gid)


def stage(export_dir, serving_dir, progress):
    """Copy the candidate into a hidden folder beside its final place: servers only load integer folder names, and a
    rename within one file system is atomic. The owner record tells a later promotion whether the writer still runs.
    Returns the owner record's path."""
    progress.staging_dir = tempfile.mkdtemp(prefix='.tmp-', dir=serving_dir)
    owner_path = os.path.join(progress.staging_dir, serving_folder.OWNER_NAME)
    with open(owner_path, 'w') as file:
        json.dump(serving_folder.owner(), file)
    shutil.copytree(export_dir, progress.staging_dir, dirs_exist_ok=True)
    make_readable(progress.staging_dir, serving_dir)
    return owner_path


def install(progress, run_info, owner_path, model_version, baseline):
    """Under the lock: record the decision in the staged run.json and rename the staged folder into place as the
    version model_version, or one more than any number taken there (retired ones too, so a number is never reused)."""
    serving_dir = progress.serving_dir
    progress.version = model_version or max(serving_folder.numbers(serving_dir), default=0) + 1
    progress.version_dir = os.path.join(serving_dir, str(progress.version))
    if os.path.exists(progress.version_dir):
        raise FileExistsError(f'{progress.version_dir} appeared while promoting: choose another model version')
    run_info['model_version'] = progress.version
    run_info['promotion'] = dict(
        baseline, promoted_at=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'))
    with open(os.path.join(progress.staging_dir, 'assets.extra', 'run.json'), 'w') as file:
        json.dump(run_info, file, indent=2)
    os.remove(owner_path)


def decide_and_install(export_dir, run_info, rule, model_version, progress):
    """Apply the rule, first without the lock (sparing the copy of a candidate the rule declines anyway), then again
    under the lock against the version served at that moment, and install the candidate if it still passes.
    run_info is the candidate's run record. Returns (the refusal, '' if promoted; the served version; its
    description)."""
    serving_dir = progress.serving_dir
    accuracy = float(run_info['accuracy'])
    warned = set()
    for line in serving_folder.clean_staging(serving_dir):
        print(line, file=sys.stderr, flush=True)
    served_version, served_accuracy = served_now(serving_dir, warned)
    refusal = refusal_against(accuracy, served_version, served_accuracy, rule)
    if refusal:
        return refusal, served_version, describe_baseline(served_version, served_accuracy)
    owner_path = stage(export_dir, serving_dir, progress)
    still_held, progress.release = serving_folder.lock(serving_dir)
    served_version, served_accuracy = served_now(serving_dir, warned)
    refusal = refusal_against(accuracy, served_version, served_accuracy, rule)
    if not refusal:
        install(progress, run_info, owner_path, model_version, {
            'decision': 'forced' if rule['force_export'] else 'promoted', 'baseline_version': served_version,
            'baseline_accuracy': served_accuracy, 'min_accuracy': rule['min_accuracy'],
            'min_improvement': rule['min_improvement']})
        if not still_held():
            raise TimeoutError(f'the promotion lock of {serving_dir} was taken over while this promotion held it; '
                               f'nothing was added')
        os.rename(progress.staging_dir, progress.version_dir)
        progress.promoted = True
    return refusal, served_version, describe_baseline(served_version, served_accuracy)


def decision_line(progress, refusal, accuracy, served_version, baseline, forced):
    """The one line that says what the promotion did."""
    if not progress.promoted:
        return f'Not promoted: {refusal}; --force_export exports it anyway.'
    version, version_dir = progress.version, progress.version_dir
    if forced:
        return (f'Forced: version {version} (test accuracy {accuracy:.4f}) exported to {version_dir} without the '
                f'promotion rule' + (f'; it replaces {baseline}' if baseline else '') + '.')
    if served_version is None:
        return (f'Promoted: version {version} (test accuracy {accuracy:.4f}) exported to {version_dir}, the first '
                f'version there.')
    return (f'Promoted: version {version} (test accuracy {accuracy:.4f}) exported to {version_dir}; it replaces '
            f'{baseline}.')


def write_json(path, content):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as file:
        json.dump(content, file, indent=2)


def write_kfp_outputs(metrics_path, ui_metadata_path, progress, line):
    """The decision as KFP run metrics (promoted 1/0, model-version) and a markdown line for the run's page. A
    failure names what was promoted all the same."""
    try:
        write_json(metrics_path, {'metrics': [
            {'name': 'promoted', 'numberValue': int(progress.promoted), 'format': 'RAW'},
            {'name': 'model-version', 'numberValue': progress.version, 'format': 'RAW'},
        ]})
        write_json(ui_metadata_path, {'outputs': [
            {'type': 'markdown', 'storage': 'inline', 'source': f'## Promotion\n\n{line}\n'}]})
    except (KeyboardInterrupt, SystemExit) as error:
        if progress.promoted:
            print(progress.stopped_line(error), file=sys.stderr, flush=True)
        raise
    except OSError as error:
        state = (f'version {progress.version} was promoted: it is {progress.version_dir}' if progress.promoted
                 else 'nothing was promoted')
        raise OSError(f'cannot write the KFP outputs of the promotion: {error.strerror or error} '
                      f'({error.filename}); {state}') from None


def promote(export_dir: InputPath('SavedModel'), serving_dir: str, mlpipeline_metrics_path: OutputPath('Metrics'),
            mlpipeline_ui_metadata_path: OutputPath('UI_metadata'), min_accuracy: float = 0.0,
            min_improvement: float = 0.0, force_export: bool = False, model_version: int = 0
            ) -> NamedTuple('PromoteOutputs', [('promoted', bool), ('model_version', int), ('decision', str)]):
    """Copy the exported candidate into serving_dir (the folder of integer versions that TF Serving polls) as a new
    version, but only if it is at least as good as the version served now. The rule:
      - its test accuracy >= min_accuracy (a floor), and
      - its test accuracy >= the accuracy in assets.extra/run.json of the version a server would serve (the largest
        loadable version, serving_folder.versions()), plus min_improvement (a tie promotes). A served version
        without a readable run.json counts as unknown: the candidate is promoted.
    force_export promotes regardless. The version is model_version, or one more than any version there or retired
    (.retired-N-*), so a number is never reused. It is built under a hidden name and renamed into place, so a polling
    server never sees it half-written; declined or failed, nothing is left in serving_dir. The decision and the rename
    happen under the folder's promotion lock, so concurrent promotions (several pods on one shared volume) are decided
    one after the other, each against the version the one before it left. Prints the decision in one line and writes
    it as KFP run metrics (promoted 1/0, model-version) and a markdown line for the run's page. Interrupted (Ctrl-C)
    or terminated (SIGTERM: a pod being stopped; it then exits with code 143), it says on stderr whether the version
    was promoted; a full disk is one line naming the folder and the cause."""
    check_rule(min_accuracy, min_improvement)
    rule = {'min_accuracy': min_accuracy, 'min_improvement': min_improvement, 'force_export': force_export}
    run_info = read_run_record(export_dir)
    accuracy = float(run_info['accuracy'])
    try:
        os.makedirs(serving_dir, exist_ok=True)
    except OSError as error:
        raise write_failure(serving_dir, error) from None
    if model_version and os.path.exists(os.path.join(serving_dir, str(model_version))):
        raise FileExistsError(f'{os.path.join(serving_dir, str(model_version))} already exists: '
                              f'choose another model version')
    progress = Progress(serving_dir)
    # SIGTERM stays caught until the KFP outputs of a promoted version are written, or until the promotion ends.
    restore_sigterm = catch_sigterm()
    try:
        try:
            refusal, served_version, baseline = decide_and_install(export_dir, run_info, rule, model_version,
                                                                    progress)
        except (shutil.Error, OSError) as error:
            if isinstance(error, (FileExistsError, TimeoutError)):
                raise
            raise write_failure(serving_dir, error) from None
    except BaseException as error:
        progress.settle()
        restore_sigterm()
        stopped = progress.stopped_line(error)
        if stopped:
            print(stopped, file=sys.stderr, flush=True)
        raise
    finally:
        progress.clean_up()
        if not progress.promoted:
            restore_sigterm()
    line = decision_line(progress, refusal, accuracy, served_version, baseline, force_export)
    print(line, flush=True)
    try:
        write_kfp_outputs(mlpipeline_metrics_path, mlpipeline_ui_metadata_path, progress, line)
    finally:
        restore_sigterm()
    return PromoteOutputs(progress.promoted, progress.version, line)


def retire(serving_dir, version):
    """Take a version out of service: rename <serving_dir>/<version> to the hidden .retired-<version>-<UTC time>
    (kept for inspection; servers ignore names that are not integers), under the promotion lock, so that the next
    largest loadable version is served again. Returns (the new name, the version a server serves now, whether the
    retired one was the served one). ValueError if the folder is not there or is the last loadable version."""
    path = os.path.join(serving_dir, str(version))
    still_held, release = serving_folder.lock(serving_dir, wait_seconds=60.0)
    try:
        versions = serving_folder.versions(serving_dir)
        if not os.path.isdir(path) or not str(version).isdigit():
            listed = ', '.join(map(str, versions)) or 'none'
            raise ValueError(f'{path} does not exist (versions there: {listed})')
        remaining = [number for number in versions if number != version]
        if version in versions and not remaining:
            raise ValueError(f'version {version} is the last one in {serving_dir}: retiring it would leave nothing '
                             f'to serve (export a better one first)')
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
        hidden_name = f'.retired-{version}-{stamp}'
        os.rename(path, os.path.join(serving_dir, hidden_name))
    finally:
        release()
    return hidden_name, max(remaining, default=None), bool(versions) and version == versions[-1]
