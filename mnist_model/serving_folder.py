"""What promote(), retire() and the model servers must agree on about a serving folder, defined once: which folders
are versions, which numbers are taken, the promotion lock, and the clean-up of unfinished promotions.

A serving folder holds integer version folders (1/, 2/, ...) that TF Serving, KServe and the local model server poll;
they serve the largest. Promotions build a version in a hidden .tmp-* folder and rename it into place under the
folder's lock, .promotion-lock. The promote step of the pipelines embeds this module's source verbatim.

    python3 -c "import serving_folder; print(serving_folder.versions('.'))"   # from mnist_model/
"""
import json
import os
import re
import secrets
import shutil
import socket
import time

LOCK_NAME = '.promotion-lock'
# The owner record a promotion leaves in its .tmp-* staging folder while it writes there.
OWNER_NAME = '.promotion-owner.json'


def versions(path):
    """The versions a server would load, sorted; the largest is the one served. A version is a folder named by ASCII
    digits without a leading zero (str.isdigit() also accepts '²', which int() refuses) that holds a saved_model.pb.
    OSError if the folder cannot be listed."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    return sorted(int(name) for name in names if re.fullmatch(r'0|[1-9][0-9]{0,17}', name, re.ASCII)
                  and os.path.isfile(os.path.join(path, name, 'saved_model.pb')))


def numbers(path):
    """Every number taken in the folder: versions, other integer folders and retired ones (.retired-N-*)."""
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
    """This process's owner record, as the lock and staging folders store it: the host, pid namespace, pid, process
    start time and a random token."""
    return {'host': socket.gethostname(), 'pid_namespace': pid_namespace(), 'pid': os.getpid(),
            'start_time': start_time(os.getpid()), 'token': secrets.token_hex(8),
            'since': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


def is_gone(record):
    """True only when the record's process provably no longer runs: it ran here, and no process with its pid and
    start time does."""
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
    """What tells one holding of the lock from the next: the owner's token, or for a lock still being made (no record
    yet) the folder's inode and time. Returns (key, record)."""
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


def take_over(lock_dir, key):
    """Take a stale lock over by renaming it away: of several waiters only one rename succeeds. If what was renamed is
    not the lock judged stale (its holder released it and another took it meanwhile), it is put back; that holder's
    still_held() says whether that worked."""
    stale_dir = f'{lock_dir}.stale-{secrets.token_hex(4)}'
    try:
        os.rename(lock_dir, stale_dir)
    except OSError:
        return
    if identity(stale_dir)[0] != key:
        try:
            os.rename(stale_dir, lock_dir)
        except OSError:
            pass
    shutil.rmtree(stale_dir, ignore_errors=True)


def record_holder(path, lock_dir, mine):
    """Write the new holder's record into the lock just made; on any failure the lock is removed again."""
    try:
        write_record(os.path.join(lock_dir, 'owner.json'), mine)
        folder_owner = os.stat(path)
        if os.geteuid() == 0 and folder_owner.st_uid != 0:
            # Taken by a pipeline step (root), it must stay removable by the notebook user owning the folder if the
            # step is killed while holding it.
            for name in (lock_dir, os.path.join(lock_dir, 'owner.json')):
                os.chown(name, folder_owner.st_uid, folder_owner.st_gid)
    except BaseException:
        shutil.rmtree(lock_dir, ignore_errors=True)
        raise


def lock(path, wait_seconds=300.0, stale_seconds=30.0):
    """Take the folder's promotion lock: a folder .promotion-lock (creating a folder is atomic, on NFS and other
    shared volumes too) holding owner.json, the holder's owner() record. A lock whose holder is provably gone (same
    host and pid namespace, no such process) is taken over at once; any other is taken over once it has not changed
    for stale_seconds (holders keep it for milliseconds). Returns (still_held, release); TimeoutError after
    wait_seconds, naming the holder."""
    lock_dir = os.path.join(path, LOCK_NAME)
    mine = owner()
    deadline = time.monotonic() + wait_seconds
    first_seen = {}
    while True:
        try:
            os.mkdir(lock_dir)
            break
        except FileExistsError:
            key, record = identity(lock_dir)
        now = time.monotonic()
        if key is not None and (is_gone(record) or now - first_seen.setdefault(key, now) > stale_seconds):
            take_over(lock_dir, key)
            continue
        if now > deadline:
            raise TimeoutError(f'{lock_dir} is held by {describe(record)}: another promotion or retirement is '
                               f'running there (waited {wait_seconds:g} s)') from None
        time.sleep(0.02)
    record_holder(path, lock_dir, mine)

    def still_held():
        return identity(lock_dir)[0] == mine['token']

    def release():
        if still_held():
            shutil.rmtree(lock_dir, ignore_errors=True)

    return still_held, release


def newest_change(folder):
    """The time of the newest change to anything in the folder; OSError or ValueError if it cannot be read."""
    return max(os.stat(os.path.join(root, entry)).st_mtime
               for root, folders, files in os.walk(folder) for entry in ['.', *files])


def clean_staging(path, max_age_seconds=3600.0):
    """Remove .tmp-* folders that no live process is writing: their owner record names a process that is gone, or
    (written on another host, or without a record) nothing in them changed for max_age_seconds. Returns one line per
    folder removed."""
    removed = []
    names = os.listdir(path) if os.path.isdir(path) else []
    for name in sorted(names):
        folder = os.path.join(path, name)
        if not name.startswith(('.tmp-', LOCK_NAME + '.stale-')) or not os.path.isdir(folder):
            continue
        record = read_record(os.path.join(folder, OWNER_NAME))
        if is_gone(record):
            reason = f'left by {describe(record)}, which is gone'
        else:
            try:
                age = time.time() - newest_change(folder)
            except (OSError, ValueError):
                continue
            if age < max_age_seconds:
                continue
            reason = f'unchanged for {age / 3600:.1f} h'
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            removed.append(f'Removed {folder}, an unfinished promotion {reason}.')
    return removed
