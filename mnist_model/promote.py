"""Promote an exported model into a serving folder only if it is measurably better than the one served, and retire a
served version to roll back.

A serving folder holds integer version folders (1/, 2/, ...) that TF Serving, KServe and the local model server poll;
they serve the largest (serving_folder.py says which folders count). promote() is the last step of every path that
makes a model -- mnist.py, a Katib trial with --export_dir, the KFP pipelines (whose promote component embeds this
module's source, evidence.py's and serving_folder.py's verbatim), and this script for any SavedModel folder -- and
applies one gate, TFX-Evaluator style (evidence.py, docs/promotion.md): the candidate and the version served now are
both run through serving_default on the same test split, in this run, and the candidate must keep the served
version's serving contract, reach the floor and the served version's accuracy (plus a margin), change at least one
prediction and lose no digit by more than a margin. No number it decides on is read from a file; run.json records
what was measured. --force_export overrides. retire() takes a version out of service.

    python3 mnist_model/promote.py /tmp/candidate --serving_dir mnist_model --data mnist_model/data/mnist.npz
    python3 mnist_model/mnist.py --retire 3               # roll back: version 3 out, the previous one served again
Exit codes of this script: 0 promoted or declined, 1 an error, 2 bad flags.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

import evidence
import serving_folder

if TYPE_CHECKING:
    # The kfp annotations stay strings at run time (from __future__ import annotations), resolved by the pipeline
    # scripts; promotion itself runs without kfp.
    from kfp.components import InputPath, OutputPath

# The gate's settings (evidence.Rule): a floor, the margin over the served version, the largest fall of one digit's
# accuracy, the fewest test images to decide on, and the override.
PROMOTION_DEFAULTS = evidence.Rule()._asdict()
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


def read_run_record(model_dir):
    """The model's run record, assets.extra/run.json ({} without one): kept and extended, never decided on."""
    try:
        with open(os.path.join(model_dir, 'assets.extra', 'run.json')) as file:
            record = json.load(file)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_test_split(dataset_path):
    """The test images and labels of a dataset npz that load_data wrote."""
    with np.load(dataset_path, allow_pickle=False) as dataset:
        return dataset['x_test'], dataset['y_test']


def served_versions(serving_dir):
    """(version, folder) of every version a server would load, newest first: the order in which the gate looks for
    the champion, the newest one that can be loaded and run."""
    return [(version, os.path.join(serving_dir, str(version)))
            for version in reversed(serving_folder.versions(serving_dir))]


def judge_now(export_dir, versions, test_split, rule, candidate=None):
    """The gate's verdict on the candidate against the served versions (served_versions(), newest first: the first
    that loads is the champion), with a line on stderr for each newer version passed over because it cannot be loaded
    or run."""
    verdict = evidence.gate(export_dir, versions, test_split, rule, candidate=candidate)
    for line in verdict.passed_over:
        print(f'warning: {line}', file=sys.stderr, flush=True)
    return verdict


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


def install(progress, run_info, owner_path, model_version, verdict):
    """Under the lock: record the decision and its evidence in the staged run.json and rename the staged folder into
    place as the version model_version, or one more than any number taken there (retired ones too, so a number is
    never reused)."""
    serving_dir = progress.serving_dir
    progress.version = model_version or max(serving_folder.numbers(serving_dir), default=0) + 1
    progress.version_dir = os.path.join(serving_dir, str(progress.version))
    if os.path.exists(progress.version_dir):
        raise FileExistsError(f'{progress.version_dir} appeared while promoting: choose another model version')
    champion = verdict.record['champion']
    run_info.update(model_version=progress.version, promotion={
        'decision': verdict.record['decision'], 'baseline_version': verdict.champion_version,
        'baseline_accuracy': champion['accuracy'] if champion else None, **verdict.record['rule'],
        'promoted_at': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
        'evidence': verdict.record})
    if verdict.candidate is not None:
        # What was measured through serving_default now, on this test split, not what the trainer said.
        run_info.update(accuracy=verdict.candidate.accuracy, test_examples=verdict.candidate.test_set.examples)
    with open(os.path.join(progress.staging_dir, 'assets.extra', 'run.json'), 'w') as file:
        json.dump(run_info, file, indent=2)
    os.remove(owner_path)


def decide_and_install(export_dir, test_split, rule, model_version, progress):
    """Apply the gate, first without the lock (sparing the copy of a candidate the gate declines anyway), then,
    under the lock, again against the version served at that moment if it changed meanwhile (the candidate is not
    measured twice), and install the candidate if it still passes. Returns the verdict that decided."""
    serving_dir = progress.serving_dir
    for line in serving_folder.clean_staging(serving_dir):
        print(line, file=sys.stderr, flush=True)
    looked_at = served_versions(serving_dir)
    verdict = judge_now(export_dir, looked_at, test_split, rule)
    if verdict.reason:
        return verdict
    owner_path = stage(export_dir, serving_dir, progress)
    still_held, progress.release = serving_folder.lock(serving_dir)
    served_now = served_versions(serving_dir)
    if served_now != looked_at:
        verdict = judge_now(export_dir, served_now, test_split, rule, candidate=verdict.candidate)
    if not verdict.reason:
        install(progress, read_run_record(export_dir), owner_path, model_version, verdict)
        if not still_held():
            raise TimeoutError(f'the promotion lock of {serving_dir} was taken over while this promotion held it; '
                               f'nothing was added')
        os.rename(progress.staging_dir, progress.version_dir)
        progress.promoted = True
    return verdict


def judged_on(verdict, serving_dir):
    """The test set the decision was made on, and whether the served version was last judged on another one."""
    test_set = evidence.Fingerprint(**verdict.record['test_set'])
    note = evidence.describe_test_split(test_set)
    if verdict.champion_version is not None:
        served_record = read_run_record(os.path.join(serving_dir, str(verdict.champion_version)))
        change = evidence.changed_test_split(test_set, served_record, f'version {verdict.champion_version}')
        note += f'; {change}' if change else ''
    return note


def decision_line(progress, verdict, rule):
    """The one line that says what the promotion did and on which test set."""
    note = judged_on(verdict, progress.serving_dir)
    if not progress.promoted:
        return f'Not promoted: {verdict.record["reason"]} ({note}); --force_export exports it anyway.'
    candidate, champion = verdict.record['candidate'], verdict.record['champion']
    measured = f'test accuracy {candidate["accuracy"]:.4f}' if candidate else 'not measured'
    head = f'version {progress.version} ({measured}) exported to {progress.version_dir}'
    replaces = (f'; it replaces {champion["accuracy"]:.4f} of {champion["name"]}' if champion
                else f', the first version there' if verdict.champion_version is None and not verdict.passed_over
                else '')
    if rule.force_export:
        said = verdict.record['reason']
        return (f'Forced: {head} without the promotion rule{replaces} ({note})'
                + (f'; the rule would have declined it: {said}' if said else '') + '.')
    return f'Promoted: {head}{replaces} ({note}).'


def write_json(path, content):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as file:
        json.dump(content, file, indent=2)


def run_page_outputs(progress, line, record):
    """The decision as KFP v1 run metrics (promoted 1/0, model-version, both models' measured accuracies) and a
    markdown section for the run's page: the line, the paired evidence and both models' accuracy per digit."""
    metrics = [{'name': 'promoted', 'numberValue': int(progress.promoted), 'format': 'RAW'},
               {'name': 'model-version', 'numberValue': progress.version, 'format': 'RAW'}]
    for name, measured in (('candidate-accuracy', record['candidate']), ('served-accuracy', record['champion'])):
        if measured is not None:
            metrics.append({'name': name, 'numberValue': measured['accuracy'], 'format': 'RAW'})
    table = evidence.per_digit_table(record)
    markdown = (f'## Promotion\n\n{line}\n\n{evidence.describe_evidence(record)}\n'
                + (f'\n{table}\n' if table else ''))
    return {'metrics': metrics}, {'outputs': [{'type': 'markdown', 'storage': 'inline', 'source': markdown}]}


def write_kfp_outputs(metrics_path, ui_metadata_path, progress, line, record):
    """Write the run page's outputs (run_page_outputs). A failure names what was promoted all the same."""
    metrics, ui_metadata = run_page_outputs(progress, line, record)
    try:
        write_json(metrics_path, metrics)
        write_json(ui_metadata_path, ui_metadata)
    except (KeyboardInterrupt, SystemExit) as error:
        if progress.promoted:
            print(progress.stopped_line(error), file=sys.stderr, flush=True)
        raise
    except OSError as error:
        state = (f'version {progress.version} was promoted: it is {progress.version_dir}' if progress.promoted
                 else 'nothing was promoted')
        raise OSError(f'cannot write the KFP outputs of the promotion: {error.strerror or error} '
                      f'({error.filename}); {state}') from None


def prepare_folder(serving_dir, model_version):
    """Make the serving folder if it does not exist (saying so), and refuse a version number already there."""
    if not os.path.isdir(serving_dir):
        try:
            os.makedirs(serving_dir)
        except OSError as error:
            raise write_failure(serving_dir, error) from None
        print(f'Created the serving folder {serving_dir}: it had no versions.', file=sys.stderr, flush=True)
    if model_version and os.path.exists(os.path.join(serving_dir, str(model_version))):
        raise FileExistsError(f'{os.path.join(serving_dir, str(model_version))} already exists: '
                              f'choose another model version')


def promote(export_dir: InputPath('SavedModel'), dataset_path: InputPath('npz'), serving_dir: str,
            mlpipeline_metrics_path: OutputPath('Metrics'), mlpipeline_ui_metadata_path: OutputPath('UI_metadata'),
            min_accuracy: float = 0.0, min_improvement: float = 0.0, max_digit_drop: float = 0.03,
            min_test_examples: int = 1000, force_export: bool = False, model_version: int = 0
            ) -> NamedTuple('PromoteOutputs', [('promoted', bool), ('model_version', int), ('decision', str)]):
    """Copy the exported candidate into serving_dir (the folder of integer versions that TF Serving polls) as a new
    version, but only if the gate passes it (evidence.judge, docs/promotion.md): the candidate and the version a
    server would serve now are measured through serving_default on the test split of dataset_path (load_data's npz),
    and the candidate must keep the served version's serving contract, reach min_accuracy and the served version's
    accuracy + min_improvement, change at least one prediction and drop no digit's accuracy by more than
    max_digit_drop, measured on at least min_test_examples images. force_export promotes regardless.
    The version is model_version, or one more than any version there or retired (.retired-N-*), so a number is never
    reused. It is built under a hidden name and renamed into place, so a polling server never sees it half-written;
    declined or failed, nothing is left in serving_dir. The decision and the rename happen under the folder's
    promotion lock, so concurrent promotions (several pods on one shared volume) are decided one after the other,
    each against the version the one before it left. Prints the decision in one line and writes it, with both
    models' accuracy per digit, as KFP run metrics and a markdown section for the run's page; the promoted version's
    run.json records the evidence. Interrupted (Ctrl-C) or terminated (SIGTERM: a pod being stopped; it then exits
    with code 143), it says on stderr whether the version was promoted; a full disk is one line naming the folder and
    the cause."""
    rule = evidence.Rule(min_accuracy, min_improvement, max_digit_drop, min_test_examples, force_export)
    evidence.check_rule(rule)
    test_split = read_test_split(dataset_path)
    prepare_folder(serving_dir, model_version)
    progress = Progress(serving_dir)
    # SIGTERM stays caught until the KFP outputs of a promoted version are written, or until the promotion ends.
    restore_sigterm = catch_sigterm()
    try:
        try:
            verdict = decide_and_install(export_dir, test_split, rule, model_version, progress)
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
    line = decision_line(progress, verdict, rule)
    table = evidence.per_digit_table(verdict.record)
    # The decision, then what it rests on: the paired evidence and both models' accuracy per digit (a markdown table).
    print(f'{line}\n  {evidence.describe_evidence(verdict.record)}' + (f'\n{table}' if table else ''), flush=True)
    try:
        write_kfp_outputs(mlpipeline_metrics_path, mlpipeline_ui_metadata_path, progress, line, verdict.record)
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
            retired = sorted(name for name in os.listdir(serving_dir) if name.startswith(f'.retired-{version}-'))
            if retired:
                raise ValueError(f'version {version} was already retired: it is {os.path.join(serving_dir, retired[-1])} '
                                 f'(versions there: {listed})')
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


def checked(convert, allowed, is_valid):
    """An argparse type that converts a value and names the allowed range when it is out of it."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):
            raise argparse.ArgumentTypeError(f'must be {allowed}, got {text!r}')
        return value
    return parse


positive_int = checked(int, 'an integer >= 1', lambda value: value >= 1)
non_negative_int = checked(int, 'an integer >= 0', lambda value: value >= 0)
fraction = checked(float, 'a fraction in [0, 1]', lambda value: 0.0 <= value <= 1.0)
accuracy_floor = checked(float, 'a test accuracy in [0, 1]', lambda value: 0.0 <= value <= 1.0)
non_negative_float = checked(float, 'a number >= 0', lambda value: 0.0 <= value < float('inf'))


def add_promotion_arguments(parser):
    """Add the gate's flags: shared by this script, mnist.py, the Katib trial and the pipeline scripts."""
    defaults = PROMOTION_DEFAULTS
    parser.add_argument('--min_accuracy', type=accuracy_floor, default=defaults['min_accuracy'],
                        help='promote only a model whose measured test accuracy is at least this, in [0, 1] '
                             '(default: %(default)s)')
    parser.add_argument('--min_improvement', type=non_negative_float, default=defaults['min_improvement'],
                        help='promote only a model whose test accuracy is at least the served version\'s plus this, '
                             'both measured now on the same test images, >= 0; 0 promotes a tie that changes '
                             'predictions (default: %(default)s)')
    parser.add_argument('--max_digit_drop', type=fraction, default=defaults['max_digit_drop'],
                        help='decline a model better overall whose accuracy on one digit falls by more than this, '
                             'in [0, 1] (default: %(default)s, see docs/promotion.md)')
    parser.add_argument('--min_test_examples', type=positive_int, default=defaults['min_test_examples'],
                        help='refuse to decide on fewer test images than this, >= 1 (default: %(default)s)')
    parser.add_argument('--force_export', action='store_true',
                        help='export as a new version regardless of the gate (the record says what it said)')


def promotion_rule_from(args):
    """The gate's settings of parsed arguments, as the dict mnist.run() takes as its rule."""
    return {name: getattr(args, name) for name in PROMOTION_DEFAULTS}


def promote_folder(candidate_dir, data, serving_dir, rule, model_version):
    """Read the data with load_data's checks, then promote the candidate folder through the gate; the run-page
    files go to a temporary folder. Returns promote()'s outputs."""
    import load_data  # The data step, with its checks; it loads nothing heavier than numpy.

    if not os.path.isfile(os.path.join(candidate_dir, 'saved_model.pb')):
        raise ValueError(f'{candidate_dir}: not a SavedModel folder (no saved_model.pb)')
    with tempfile.TemporaryDirectory(prefix='promote-') as work_dir:
        dataset_path = os.path.join(work_dir, 'dataset.npz')
        load_data.load_data(data, dataset_path)
        return promote(candidate_dir, dataset_path, serving_dir, os.path.join(work_dir, 'metrics.json'),
                       os.path.join(work_dir, 'ui-metadata.json'), model_version=model_version, **rule)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='promote.py', description='Promote any SavedModel folder into a serving folder through the same gate as '
                                       'mnist.py: measured against the version served now on the same test images.')
    parser.add_argument('candidate_dir', help='the SavedModel folder to promote (serving_default: 784 raw pixels)')
    parser.add_argument('--serving_dir', required=True,
                        help='the folder of integer versions that TF Serving, KServe and the local server poll')
    parser.add_argument('--data', required=True,
                        help='the data whose test split both models are measured on: a Keras-layout mnist.npz or a '
                             'folder of the four MNIST IDX files (e.g. mnist_model/data/mnist.npz)')
    parser.add_argument('--model_version', type=non_negative_int, default=0,
                        help='integer version to promote as (default: one more than any version there or retired)')
    add_promotion_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    try:
        promote_folder(args.candidate_dir, args.data, args.serving_dir, promotion_rule_from(args), args.model_version)
    except (ValueError, OSError) as error:  # TimeoutError and FileExistsError are OSErrors.
        print(f'promote.py: error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('promote.py: interrupted', file=sys.stderr)  # promote() said whether it had promoted.
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
