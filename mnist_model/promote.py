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
import types
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
      - its test accuracy >= the accuracy in assets.extra/run.json of the version a server would serve (the largest
        loadable version, serving_folder().versions()), plus min_improvement (a tie promotes). A served version
        without a readable run.json counts as unknown: the candidate is promoted.
    force_export promotes regardless. The version is model_version, or one more than any version there or retired
    (.retired-N-*), so a number is never reused. It is built under a hidden name and renamed into place, so a polling
    server never sees it half-written; declined or failed, nothing is left in serving_dir. The decision and the rename
    happen under the folder's promotion lock, so concurrent promotions (several pods on one shared volume) are decided
    one after the other, each against the version the one before it left. Prints the decision in one line and writes
    it as KFP run metrics (promoted 1/0, model-version) and a markdown line for the run's page. Interrupted (Ctrl-C)
    or terminated (SIGTERM: a pod being stopped; it then exits with code 143), it says on stderr whether the version
    was promoted; a full disk is one line naming the folder and the cause."""
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

    def serving_folder(path):
        """What promote(), retire() and the model servers must agree on about a serving folder, defined once. It is
        here, inside the step, because a KFP lightweight component carries only its function's source; promote.py
        takes it out for the others. Returns a namespace of functions:
          versions()    the versions a server would load, sorted; the largest is the one served. A version is a
                        folder named by ASCII digits without a leading zero (str.isdigit() also accepts '²', which
                        int() refuses) that holds a saved_model.pb. OSError if the folder cannot be listed.
          numbers()     every number taken there: versions, other integer folders and retired ones (.retired-N-*).
          lock(wait_seconds, stale_seconds)
                        take the folder's promotion lock: a folder .promotion-lock (creating a folder is atomic, on
                        NFS and other shared volumes too) holding owner.json, the holder's host, pid namespace, pid,
                        process start time and a random token. A lock whose holder is provably gone (same host and pid
                        namespace, no such process) is taken over at once; any other is taken over once it has not
                        changed for stale_seconds (holders keep it for milliseconds). Returns (still_held, release);
                        TimeoutError after wait_seconds, naming the holder.
          owner()       this process's owner record, as the lock and staging folders store it.
          clean_staging(max_age_seconds)
                        remove .tmp-* folders that no live process is writing: their owner record names a process
                        that is gone, or (written on another host, or without a record) nothing in them changed for
                        max_age_seconds. Returns one line per folder removed."""
        import json
        import os
        import re
        import secrets
        import shutil
        import socket
        import time
        import types

        lock_dir = os.path.join(path, '.promotion-lock')
        owner_name = '.promotion-owner.json'

        def versions():
            try:
                names = os.listdir(path)
            except FileNotFoundError:
                return []
            return sorted(int(name) for name in names if re.fullmatch(r'0|[1-9][0-9]{0,17}', name, re.ASCII)
                          and os.path.isfile(os.path.join(path, name, 'saved_model.pb')))

        def numbers():
            names = os.listdir(path) if os.path.isdir(path) else []
            matches = [re.fullmatch(r'([0-9]{1,18})|\.retired-([0-9]{1,18})-.*', name, re.ASCII) for name in names]
            return [int(match.group(1) or match.group(2)) for match in matches if match]

        def start_time(pid):
            """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
            try:
                with open(f'/proc/{pid}/stat') as stat_file:
                    return int(stat_file.read().rsplit(')', 1)[1].split()[19])
            except (OSError, IndexError, ValueError):
                return None

        def pid_namespace():
            try:
                return os.readlink('/proc/self/ns/pid')
            except OSError:
                return ''

        def owner():
            return {'host': socket.gethostname(), 'pid_namespace': pid_namespace(), 'pid': os.getpid(),
                    'start_time': start_time(os.getpid()), 'token': secrets.token_hex(8),
                    'since': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}

        def is_gone(record):
            """True only when the record's process provably no longer runs: it ran here, and no process with its
            pid and start time does."""
            if not isinstance(record, dict) or record.get('host') != socket.gethostname() \
                    or record.get('pid_namespace') != pid_namespace() or not isinstance(record.get('pid'), int):
                return False
            if start_time(os.getpid()) is None:  # No /proc: ask the kernel whether the pid exists at all.
                try:
                    os.kill(record['pid'], 0)
                except ProcessLookupError:
                    return True
                except OSError:
                    return False
                return False
            return start_time(record['pid']) != record.get('start_time')

        def read_record(record_path):
            try:
                with open(record_path) as record_file:
                    return json.load(record_file)
            except (OSError, ValueError):
                return None

        def write_record(record_path, record):
            # Written beside and renamed, so that a reader sees the whole record or none.
            with open(record_path + '.writing', 'w') as record_file:
                json.dump(record, record_file)
            os.replace(record_path + '.writing', record_path)

        def identity(folder):
            """What tells one holding of the lock from the next: the owner's token, or for a lock still being made
            (no record yet) the folder's inode and time."""
            record = read_record(os.path.join(folder, 'owner.json'))
            if isinstance(record, dict) and 'token' in record:
                return record['token'], record
            try:
                stat = os.stat(folder)
            except OSError:
                return None, None
            return f'{stat.st_ino}-{stat.st_mtime_ns}', None

        def describe(record):
            if not isinstance(record, dict):
                return 'a process that has not written its owner record'
            return f'pid {record.get("pid")} on host {record.get("host")} since {record.get("since")}'

        def lock(wait_seconds=300.0, stale_seconds=30.0):
            mine = owner()
            deadline = time.monotonic() + wait_seconds
            first_seen = {}
            while True:
                try:
                    os.mkdir(lock_dir)
                except FileExistsError:
                    key, record = identity(lock_dir)
                    now = time.monotonic()
                    if key is not None and (is_gone(record) or now - first_seen.setdefault(key, now) > stale_seconds):
                        # Taken over by renaming it away: of several waiters only one rename succeeds. If what was
                        # renamed is not the lock judged stale (its holder released it and another took it
                        # meanwhile), it is put back; that holder's still_held() says whether that worked.
                        stale_dir = f'{lock_dir}.stale-{secrets.token_hex(4)}'
                        try:
                            os.rename(lock_dir, stale_dir)
                        except OSError:
                            continue
                        if identity(stale_dir)[0] != key:
                            try:
                                os.rename(stale_dir, lock_dir)
                            except OSError:
                                pass
                        shutil.rmtree(stale_dir, ignore_errors=True)
                        continue
                    if now > deadline:
                        raise TimeoutError(f'{lock_dir} is held by {describe(record)}: another promotion or retirement '
                                           f'is running there (waited {wait_seconds:g} s)') from None
                    time.sleep(0.02)
                    continue
                try:
                    write_record(os.path.join(lock_dir, 'owner.json'), mine)
                    folder_owner = os.stat(path)
                    if os.geteuid() == 0 and folder_owner.st_uid != 0:
                        # Taken by a pipeline step (root), it must stay removable by the notebook user owning the
                        # folder if the step is killed while holding it.
                        for name in (lock_dir, os.path.join(lock_dir, 'owner.json')):
                            os.chown(name, folder_owner.st_uid, folder_owner.st_gid)
                except BaseException:
                    shutil.rmtree(lock_dir, ignore_errors=True)
                    raise
                break

            def still_held():
                return identity(lock_dir)[0] == mine['token']

            def release():
                if still_held():
                    shutil.rmtree(lock_dir, ignore_errors=True)

            return still_held, release

        def clean_staging(max_age_seconds=3600.0):
            removed = []
            names = os.listdir(path) if os.path.isdir(path) else []
            for name in sorted(names):
                folder = os.path.join(path, name)
                if not (name.startswith('.tmp-') or name.startswith('.promotion-lock.stale-')) \
                        or not os.path.isdir(folder):
                    continue
                record = read_record(os.path.join(folder, owner_name))
                if is_gone(record):
                    reason = f'left by {describe(record)}, which is gone'
                else:
                    try:
                        newest = max(os.stat(os.path.join(root, entry)).st_mtime
                                     for root, folders, files in os.walk(folder) for entry in ['.', *files])
                    except (OSError, ValueError):
                        continue
                    if time.time() - newest < max_age_seconds:
                        continue
                    reason = f'unchanged for {(time.time() - newest) / 3600:.1f} h'
                shutil.rmtree(folder, ignore_errors=True)
                if not os.path.exists(folder):
                    removed.append(f'Removed {folder}, an unfinished promotion {reason}.')
            return removed

        return types.SimpleNamespace(versions=versions, numbers=numbers, lock=lock, owner=owner,
                                     clean_staging=clean_staging, owner_name=owner_name)

    if not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f'min_accuracy must be a test accuracy in [0, 1], got {min_accuracy}')
    if not min_improvement >= 0.0:
        raise ValueError(f'min_improvement must be >= 0, got {min_improvement}')
    with open(os.path.join(export_dir, 'assets.extra', 'run.json')) as file:
        run_info = json.load(file)
    accuracy = float(run_info['accuracy'])
    folder = serving_folder(serving_dir)

    def write_failure(error):
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

    warned = set()

    def served_now():
        """The version a server would serve now and its recorded test accuracy (None: unknown)."""
        served_version = max(folder.versions(), default=None)
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
            warning = (f'warning: cannot read the test accuracy of served version {served_version} from '
                       f'{record_path} ({reason}); treating it as unknown')
            if warning not in warned:  # The rule looks twice: before the copy and under the lock.
                warned.add(warning)
                print(warning, file=sys.stderr, flush=True)
            return served_version, None
        return served_version, served_accuracy

    def refusal_against(served_version, served_accuracy):
        """Why the rule declines the candidate against that served version ('' if it promotes), and the baseline's
        description."""
        # Accuracies are counts over the test set; the tolerance keeps a float sum such as 0.97 + 0.01 from refusing
        # a tie.
        tolerance = 1e-9
        baseline = '' if served_version is None else (
            f'version {served_version} (accuracy unknown)' if served_accuracy is None
            else f'{served_accuracy:.4f} of version {served_version}')
        if force_export:
            return '', baseline
        if not math.isfinite(accuracy):
            return f'its test accuracy {accuracy} is not a number', baseline
        if accuracy + tolerance < min_accuracy:
            return f'its test accuracy {accuracy:.4f} is below the floor --min_accuracy {min_accuracy:.4f}', baseline
        if served_accuracy is not None and accuracy + tolerance < served_accuracy + min_improvement:
            needed = f' + --min_improvement {min_improvement:.4f}' if min_improvement else ''
            return f'its test accuracy {accuracy:.4f} is below {baseline}{needed}, which stays in service', baseline
        return '', baseline

    try:
        os.makedirs(serving_dir, exist_ok=True)
    except OSError as error:
        raise write_failure(error) from None
    if model_version and os.path.exists(os.path.join(serving_dir, str(model_version))):
        raise FileExistsError(f'{os.path.join(serving_dir, str(model_version))} already exists: '
                              f'choose another model version')
    promoted, version, version_dir = False, 0, ''
    staging_dir, release = None, None

    def terminate(signal_number, frame):
        # SIGTERM would end the process where it stands, leaving the staging folder behind; ended this way, the
        # promotion cleans up and says what it did, as after Ctrl-C.
        raise SystemExit(128 + signal_number)

    def stopped_line(error):
        """For Ctrl-C or SIGTERM: the stderr line saying whether the version was promoted; None for other errors."""
        if not isinstance(error, (KeyboardInterrupt, SystemExit)):
            return None
        state = (f'version {version} was promoted: it is {version_dir}' if promoted else
                 f'nothing was promoted; {serving_dir} is as it was')
        return f'promote: {"interrupted" if isinstance(error, KeyboardInterrupt) else "terminated"}; {state}'

    # Signal handlers can only be set in the main thread (a notebook may promote from another one). It stays set
    # until the KFP outputs of a promoted version are written, or until the promotion ends otherwise.
    previous_sigterm = [signal.signal(signal.SIGTERM, terminate)] \
        if threading.current_thread() is threading.main_thread() else []

    def restore_sigterm():
        while previous_sigterm:
            signal.signal(signal.SIGTERM, previous_sigterm.pop() or signal.SIG_DFL)  # None: one set outside Python
    try:
        try:
            for line in folder.clean_staging():
                print(line, file=sys.stderr, flush=True)
            # A first look without the lock spares copying a candidate that the rule declines anyway; the rule is
            # applied again under the lock, against the version served then.
            served_version, served_accuracy = served_now()
            refusal, baseline = refusal_against(served_version, served_accuracy)
            if not refusal:
                decision = 'forced' if force_export else 'promoted'
                # Built in a hidden folder beside its final place: servers only load integer folder names, and a
                # rename within one file system is atomic. The owner record tells a later promotion whether the
                # writer still runs.
                staging_dir = tempfile.mkdtemp(prefix='.tmp-', dir=serving_dir)
                owner_path = os.path.join(staging_dir, folder.owner_name)
                with open(owner_path, 'w') as file:
                    json.dump(folder.owner(), file)
                shutil.copytree(export_dir, staging_dir, dirs_exist_ok=True)
                owner = os.stat(serving_dir)
                for directory, _, files in os.walk(staging_dir):
                    # mkdtemp makes the folder private; a server running as another user must be able to read it.
                    os.chmod(directory, 0o755)
                    for name in files:
                        os.chmod(os.path.join(directory, name), 0o644)
                    if os.geteuid() == 0 and owner.st_uid != 0:
                        # A pipeline step runs as root; the notebook user who owns the folder must be able to retire
                        # it.
                        for path in [directory] + [os.path.join(directory, name) for name in files]:
                            os.chown(path, owner.st_uid, owner.st_gid)
                still_held, release = folder.lock()
                served_version, served_accuracy = served_now()
                refusal, baseline = refusal_against(served_version, served_accuracy)
                if not refusal:
                    version = model_version or max(folder.numbers(), default=0) + 1
                    version_dir = os.path.join(serving_dir, str(version))
                    if os.path.exists(version_dir):
                        raise FileExistsError(f'{version_dir} appeared while promoting: choose another model version')
                    run_info['model_version'] = version
                    run_info['promotion'] = {
                        'decision': decision, 'baseline_version': served_version,
                        'baseline_accuracy': served_accuracy, 'min_accuracy': min_accuracy,
                        'min_improvement': min_improvement,
                        'promoted_at': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}
                    with open(os.path.join(staging_dir, 'assets.extra', 'run.json'), 'w') as file:
                        json.dump(run_info, file, indent=2)
                    os.remove(owner_path)
                    if not still_held():
                        raise TimeoutError(f'the promotion lock of {serving_dir} was taken over while this promotion '
                                           f'held it; nothing was added')
                    os.rename(staging_dir, version_dir)
                    promoted = True
        except (shutil.Error, OSError) as error:
            if isinstance(error, (FileExistsError, TimeoutError)):
                raise
            raise write_failure(error) from None
    except BaseException as error:
        # Whatever stopped the promotion, the version is either whole in place or not there at all.
        promoted = promoted or bool(version_dir and os.path.isdir(version_dir) and staging_dir
                                    and not os.path.exists(staging_dir))
        restore_sigterm()
        stopped = stopped_line(error)
        if stopped:
            print(stopped, file=sys.stderr, flush=True)
        raise
    finally:
        if staging_dir is not None and os.path.exists(staging_dir):
            shutil.rmtree(staging_dir, ignore_errors=True)
        if release is not None:
            release()
        if not promoted:
            restore_sigterm()
    if not promoted:
        version = 0
        line = f'Not promoted: {refusal}; --force_export exports it anyway.'
    elif force_export:
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

    try:
        write_json(mlpipeline_metrics_path, {'metrics': [
            {'name': 'promoted', 'numberValue': int(promoted), 'format': 'RAW'},
            {'name': 'model-version', 'numberValue': version, 'format': 'RAW'},
        ]})
        write_json(mlpipeline_ui_metadata_path, {'outputs': [
            {'type': 'markdown', 'storage': 'inline', 'source': f'## Promotion\n\n{line}\n'}]})
    except (KeyboardInterrupt, SystemExit) as error:
        if promoted:
            print(stopped_line(error), file=sys.stderr, flush=True)
        raise
    except OSError as error:
        state = f'version {version} was promoted: it is {version_dir}' if promoted else 'nothing was promoted'
        raise OSError(f'cannot write the KFP outputs of the promotion: {error.strerror or error} '
                      f'({error.filename}); {state}') from None
    finally:
        restore_sigterm()
    return collections.namedtuple('PromoteOutputs', ['promoted', 'model_version', 'decision'])(
        promoted, version, line)


def nested_function(outer, name):
    """The function `name` defined inside the function `outer`, as a module-level function. It must use nothing of
    outer's (no closure), which its own imports make true."""
    (code,) = [constant for constant in outer.__code__.co_consts if getattr(constant, 'co_name', None) == name]
    assert not code.co_freevars, f'{name} uses variables of {outer.__name__}: {code.co_freevars}'
    return types.FunctionType(code, globals(), name)


# The one definition of a serving folder's versions, lock and staging folders, shared by promote(), retire() and the
# model servers (serving_versions.list_versions).
serving_folder = nested_function(promote, 'serving_folder')


def retire(serving_dir, version):
    """Take a version out of service: rename <serving_dir>/<version> to the hidden .retired-<version>-<UTC time>
    (kept for inspection; servers ignore names that are not integers), under the promotion lock, so that the next
    largest loadable version is served again. Returns (the new name, the version a server serves now, whether the
    retired one was the served one). ValueError if the folder is not there or is the last loadable version."""
    folder = serving_folder(serving_dir)
    path = os.path.join(serving_dir, str(version))
    still_held, release = folder.lock(wait_seconds=60.0)
    try:
        versions = folder.versions()
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
