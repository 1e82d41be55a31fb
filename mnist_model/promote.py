"""Promote an exported model into a serving folder only if it is at least as good as the one served, and retire a
served version to roll back.

A serving folder holds integer version folders (1/, 2/, ...) that TF Serving, KServe and the local model server poll;
they serve the largest. promote() is the last step of every path that makes a model -- mnist.py, a Katib trial with
--export_dir, the KFP pipeline (as a lightweight component, so it keeps its imports inside itself) -- and applies one
rule, TFX-Evaluator style: the candidate's test accuracy must reach a floor (min_accuracy) and the served version's
accuracy plus min_improvement (a tie promotes); force_export overrides. retire() takes a version out of service.

    python3 mnist_model/mnist.py --min_accuracy 0.97      # train, and serve the result only if it is good enough
    python3 mnist_model/mnist.py --retire 3               # roll back: version 3 out, the previous one served again
"""
from __future__ import annotations

import datetime
import os
import re
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    # As in mnist.py: the kfp annotations stay strings at run time, resolved by mnist_pipeline.py.
    from kfp.components import InputPath, OutputPath

# The promotion rule's settings: a floor, the margin over the served version, and the override.
PROMOTION_DEFAULTS = {'min_accuracy': 0.0, 'min_improvement': 0.0, 'force_export': False}


def promote(export_dir: InputPath('SavedModel'), serving_dir: str, mlpipeline_metrics_path: OutputPath('Metrics'),
            mlpipeline_ui_metadata_path: OutputPath('UI_metadata'), min_accuracy: float = 0.0,
            min_improvement: float = 0.0, force_export: bool = False, model_version: int = 0
            ) -> NamedTuple('PromoteOutputs', [('promoted', bool), ('model_version', int), ('decision', str)]):
    """Copy the exported candidate into serving_dir (the folder of integer versions that TF Serving polls) as a new
    version, but only if it is at least as good as the version served now. The rule:
      - its test accuracy >= min_accuracy (a floor), and
      - its test accuracy >= the accuracy in assets.extra/run.json of the largest version there, plus min_improvement
        (a tie promotes). A served version without a readable run.json counts as unknown: the candidate is promoted.
    force_export promotes regardless. The version is model_version, or one more than any version there or retired
    (.retired-N-*), so a number is never reused. It is built under a hidden name and renamed into place, so a polling
    server never sees it half-written; declined, nothing is left in serving_dir. Prints the decision in one line and
    writes it as KFP run metrics (promoted 1/0, model-version) and a markdown line for the run's page."""
    import collections
    import datetime
    import json
    import math
    import os
    import re
    import shutil
    import sys
    import tempfile

    if not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f'min_accuracy must be a test accuracy in [0, 1], got {min_accuracy}')
    if not min_improvement >= 0.0:
        raise ValueError(f'min_improvement must be >= 0, got {min_improvement}')
    with open(os.path.join(export_dir, 'assets.extra', 'run.json')) as file:
        run_info = json.load(file)
    accuracy = float(run_info['accuracy'])

    def numbered(pattern):
        """The version numbers of the folders in serving_dir whose names match pattern (group 1 is the number)."""
        names = os.listdir(serving_dir) if os.path.isdir(serving_dir) else []
        return [int(match.group(1)) for match in map(re.compile(pattern).fullmatch, names) if match]

    def next_version():
        return max(numbered(r'([0-9]+)') + numbered(r'\.retired-([0-9]+)-.*'), default=0) + 1

    os.makedirs(serving_dir, exist_ok=True)
    if model_version and os.path.exists(os.path.join(serving_dir, str(model_version))):
        raise FileExistsError(f'{os.path.join(serving_dir, str(model_version))} already exists: '
                              f'choose another model version')
    served_version = max(numbered(r'([0-9]+)'), default=None)
    served_accuracy = None
    if served_version is not None:
        record_path = os.path.join(serving_dir, str(served_version), 'assets.extra', 'run.json')
        try:
            with open(record_path) as file:
                served_accuracy = float(json.load(file)['accuracy'])
            if not 0.0 <= served_accuracy <= 1.0:
                raise ValueError(f'accuracy {served_accuracy} is not in [0, 1]')
        except (OSError, ValueError, KeyError, TypeError) as error:
            served_accuracy = None
            reason = 'it has none' if isinstance(error, FileNotFoundError) else f'{type(error).__name__}: {error}'
            print(f'warning: cannot read the test accuracy of served version {served_version} from {record_path} '
                  f'({reason}); treating it as unknown', file=sys.stderr, flush=True)

    # Accuracies are counts over the test set; the tolerance keeps a float sum such as 0.97 + 0.01 from refusing a tie.
    tolerance = 1e-9
    baseline = '' if served_version is None else (
        f'version {served_version} (accuracy unknown)' if served_accuracy is None
        else f'{served_accuracy:.4f} of version {served_version}')
    refusal = ''
    if not force_export:
        if not math.isfinite(accuracy):
            refusal = f'its test accuracy {accuracy} is not a number'
        elif accuracy + tolerance < min_accuracy:
            refusal = f'its test accuracy {accuracy:.4f} is below the floor --min_accuracy {min_accuracy:.4f}'
        elif served_accuracy is not None and accuracy + tolerance < served_accuracy + min_improvement:
            needed = f' + --min_improvement {min_improvement:.4f}' if min_improvement else ''
            refusal = f'its test accuracy {accuracy:.4f} is below {baseline}{needed}, which stays in service'
    if refusal:
        promoted, version = False, 0
        line = f'Not promoted: {refusal}; --force_export exports it anyway.'
    else:
        decision = 'forced' if force_export else 'promoted'
        version = model_version or next_version()
        # Build the version in a hidden folder beside its final place: TF Serving only loads integer folder names,
        # and a rename within one file system is atomic.
        staging_dir = tempfile.mkdtemp(prefix=f'.tmp-{version}-', dir=serving_dir)
        try:
            shutil.copytree(export_dir, staging_dir, dirs_exist_ok=True)
            owner = os.stat(serving_dir)
            for folder, _, files in os.walk(staging_dir):
                # mkdtemp makes the folder private; a server running as another user must be able to read it.
                os.chmod(folder, 0o755)
                for name in files:
                    os.chmod(os.path.join(folder, name), 0o644)
                if os.geteuid() == 0 and owner.st_uid != 0:
                    # A pipeline step runs as root; the notebook user who owns the folder must be able to retire it.
                    for path in [folder] + [os.path.join(folder, name) for name in files]:
                        os.chown(path, owner.st_uid, owner.st_gid)
            while True:
                run_info['model_version'] = version
                run_info['promotion'] = {
                    'decision': decision, 'baseline_version': served_version, 'baseline_accuracy': served_accuracy,
                    'min_accuracy': min_accuracy, 'min_improvement': min_improvement,
                    'promoted_at': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}
                with open(os.path.join(staging_dir, 'assets.extra', 'run.json'), 'w') as file:
                    json.dump(run_info, file, indent=2)
                version_dir = os.path.join(serving_dir, str(version))
                try:
                    if os.path.exists(version_dir):
                        raise FileExistsError(f'{version_dir} appeared while promoting: choose another model version')
                    os.rename(staging_dir, version_dir)
                    break
                except OSError:
                    # Another promotion took this number meanwhile: take the next free one, unless the number was
                    # asked for or the rename failed for another reason (then the number is still free).
                    if model_version or next_version() == version:
                        raise
                    version = next_version()
        except BaseException:
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise
        promoted = True
        if force_export:
            line = f'Forced: version {version} (test accuracy {accuracy:.4f}) exported to {version_dir} without the ' \
                   f'promotion rule' + (f'; it replaces {baseline}' if baseline else '') + '.'
        elif served_version is None:
            line = f'Promoted: version {version} (test accuracy {accuracy:.4f}) exported to {version_dir}, the first ' \
                   f'version there.'
        else:
            line = f'Promoted: version {version} (test accuracy {accuracy:.4f}) exported to {version_dir}; it ' \
                   f'replaces {baseline}.'
    print(line, flush=True)

    def write_json(path, content):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as file:
            json.dump(content, file, indent=2)

    write_json(mlpipeline_metrics_path, {'metrics': [
        {'name': 'promoted', 'numberValue': int(promoted), 'format': 'RAW'},
        {'name': 'model-version', 'numberValue': version, 'format': 'RAW'},
    ]})
    write_json(mlpipeline_ui_metadata_path, {'outputs': [
        {'type': 'markdown', 'storage': 'inline', 'source': f'## Promotion\n\n{line}\n'}]})
    return collections.namedtuple('PromoteOutputs', ['promoted', 'model_version', 'decision'])(
        promoted, version, line)


def retire(serving_dir, version):
    """Take a version out of service: rename <serving_dir>/<version> to the hidden .retired-<version>-<UTC time>
    (kept for inspection; servers ignore names that are not integers), so the next largest version is served again.
    Returns (the new name, the version served now). ValueError if the version is not there or is the last one."""
    versions = sorted(int(name) for name in (os.listdir(serving_dir) if os.path.isdir(serving_dir) else [])
                      if re.fullmatch(r'[0-9]+', name))
    if version not in versions:
        listed = ', '.join(map(str, versions)) or 'none'
        raise ValueError(f'{os.path.join(serving_dir, str(version))} does not exist (versions there: {listed})')
    if len(versions) == 1:
        raise ValueError(f'version {version} is the last one in {serving_dir}: retiring it would leave nothing to '
                         f'serve (export a better one first)')
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    hidden_name = f'.retired-{version}-{stamp}'
    os.rename(os.path.join(serving_dir, str(version)), os.path.join(serving_dir, hidden_name))
    return hidden_name, max(number for number in versions if number != version)
