"""The model versions a model server holds: load SavedModel folders, serve the newest, keep the one before it warm.

`<base_path>/<integer version>/` folders holding a `saved_model.pb` are versions, by the one definition that
promotion shares (serving_folder.py: names of ASCII digits only); every other name is ignored (`.tmp-*` exports
being written, `.retired-*` versions taken out of service, `data/`, `²/`, ...). `ModelRepository`
serves the largest version and keeps the second largest loaded as a warm standby, as TF Serving does with
`model_version_policy { latest { num_versions: 2 } }`: both answer requests that name their version, requests that
name none go to the largest. When the served version's folder disappears (a bad version retired by renaming it), the
standby takes over at once and the next older version is loaded as the new standby; when a newer version appears,
it is loaded and warmed up completely before it replaces the served one, which becomes the standby. Requests in
flight finish on the version they started with, so none fails during a switch. A poll never stops the polling: an
error is one log line and the next poll runs. A version that fails to load is tried again up to max_load_retries
times, load_retry_seconds apart (TF Serving's --max_num_load_retries and --load_retry_interval_micros), and at once
when the files inside it change and then stay unchanged for one poll (a copy by hand that was still in progress:
writing into files does not change the folder's modification time).

Example (the server's poll loop):
    repository = ModelRepository('mnist_model', 'mnist', keep_standby=True)
    repository.refresh()   # load the newest version, then the standby
    served = repository.find(None)
"""

import os
import threading
import time
import typing

import numpy as np

import serving_folder
from serving_log import log_line


class InputInfo(typing.NamedTuple):
    """What a request's value for one signature input must be, prepared once per version for fast checks."""
    dtype: object            # tf.DType
    numpy_dtype: object
    is_string: bool
    allowed_kinds: str       # numpy dtype kinds accepted from JSON: 'iuf' for floats, 'iu' for integers, 'b' bools
    shape: typing.Optional[tuple]   # None for any shape; None entries are free sizes
    shape_text: str


class ServedVersion:
    """One loaded SavedModel version: its callable signatures, their inputs, and the signature_def for metadata."""

    def __init__(self, version, path, loaded, signature_defs):
        self.version = version
        self.path = path
        # Keep the loaded object alive: the signature functions refer to its variables.
        self.loaded = loaded
        self.signatures = dict(loaded.signatures)
        self.input_specs = {name: function.structured_input_signature[1]
                            for name, function in self.signatures.items()}
        self.inputs = {name: {input_name: describe_input(spec) for input_name, spec in specs.items()}
                       for name, specs in self.input_specs.items()}
        # A signature can be batched when every input has a free first (batch) dimension.
        self.batchable = {name: all(info.shape and info.shape[0] is None for info in inputs.values())
                          for name, inputs in self.inputs.items()}
        self.signature_defs = signature_defs
        # What predicts call, by signature name: the public signature function, or the faster FlatCall once
        # warm_up has found that it gives the same outputs.
        self.callers = dict(self.signatures)


def describe_input(spec):
    import tensorflow as tf

    shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
    shape_text = 'any shape' if shape is None else str([-1 if size is None else size for size in shape])
    if spec.dtype == tf.string:
        kinds = ''
    else:
        kinds = 'iuf' if spec.dtype.is_floating else 'iu' if spec.dtype.is_integer else 'b'
    return InputInfo(spec.dtype, None if spec.dtype == tf.string else spec.dtype.as_numpy_dtype,
                     spec.dtype == tf.string, kinds, shape, shape_text)


def list_versions(base_path):
    """The sorted versions under base_path that a server loads (serving_folder.py's definition, which the
    promotion rule uses for the served version too); raises OSError if base_path exists but cannot be listed."""
    return serving_folder.versions(base_path)


def read_signature_defs(saved_model_dir):
    """Return the SavedModel's signature_def map as TF Serving prints it in GET .../metadata."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, 'saved_model.pb'), 'rb') as proto_file:
        saved_model.ParseFromString(proto_file.read())
    meta_graph = saved_model.meta_graphs[0]
    return {name: json_format.MessageToDict(signature_def, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            for name, signature_def in meta_graph.signature_def.items()}


def load_version(base_path, version):
    """Load <base_path>/<version> completely (weights and signatures) and return it as a ServedVersion."""
    import tensorflow as tf

    path = os.path.join(base_path, str(version))
    loaded = tf.saved_model.load(path)
    served = ServedVersion(version, path, loaded, read_signature_defs(path))
    warm_up(served)
    return served


def warm_up(served):
    """Call each signature once with one and with two examples (zeros for numbers, a small black PNG for strings),
    so that TensorFlow's first-call work for single requests and for batches happens before the version serves; and
    let predicts use a FlatCall for each signature whose outputs it reproduces exactly."""
    import tensorflow as tf

    blank_png = tf.io.encode_png(tf.zeros([28, 28, 1], tf.uint8))
    for name, inputs in served.inputs.items():
        if any(info.shape is None for info in inputs.values()):
            continue
        for batch_size in (1, 2):
            examples = {}
            for input_name, info in inputs.items():
                shape = [batch_size if index == 0 and size is None else 1 if size is None else size
                         for index, size in enumerate(info.shape)]
                if info.is_string:
                    examples[input_name] = tf.fill(shape, blank_png)
                else:
                    # Distinct values per input and position, so that inputs or outputs in the wrong order show.
                    count = int(np.prod(shape))
                    values = (np.arange(count) * 7 + 3 * len(examples)) % (2 if info.dtype == tf.bool else 251)
                    examples[input_name] = tf.constant(values.reshape(shape).astype(info.numpy_dtype))
            try:
                expected = served.signatures[name](**examples)
            except Exception:  # Warm-up is an optimisation only; real requests report real errors.
                continue
            if batch_size == 2:
                served.callers[name] = checked_flat_call(name, served.signatures[name], examples, expected)


class FlatCall:
    """A signature function called through TensorFlow's internal API: its AtomicFunction (`_inference_function`)
    with the function's captured inputs (its variables), as the public call does in the end. Why: on TF 2.20 the
    public call of this model's serving_default with one row took 320 to 400 us, this one 190 to 250 us (the public
    one binds the keyword arguments to the signature's structure, checks them and packs the outputs again, all in
    Python); in the server (December 2026, 2 cores) 1 client got p50 0.92 to 0.95 ms against 1.10 to 1.13 ms with
    the public call, 8 clients 2 050 to 2 100 requests/s against 1 840. It skips the public call's checks of the
    inputs, which read_predict_request makes before any call; and as an internal API it may change in any
    TensorFlow release, so checked_flat_call tries it against the public call once per loaded version and falls
    back to that whenever anything differs or is missing."""

    def __init__(self, function):
        self.atomic = function._inference_function
        self.captured = list(function.captured_inputs)
        # The order in which the public call flattens keyword inputs and dict outputs (tf.nest: sorted keys).
        self.input_names = sorted(function.structured_input_signature[1])
        self.output_names = sorted(function.structured_outputs)

    def __call__(self, **tensors):
        outputs = self.atomic.call_flat(*[tensors[name] for name in self.input_names], *self.captured)
        return dict(zip(self.output_names, outputs))


def checked_flat_call(name, function, examples, expected):
    """A FlatCall of function if it gives exactly the outputs `expected` of the public call on `examples`, else
    function itself."""
    import tensorflow as tf

    try:
        specs = [*function.structured_input_signature[1].values(), *function.structured_outputs.values()]
        if function.structured_input_signature[0] or not all(isinstance(spec, tf.TensorSpec) for spec in specs):
            return function  # positional or composite inputs and outputs: only the public call packs them right
        flat_call = FlatCall(function)
        outputs = flat_call(**examples)
        same = outputs.keys() == expected.keys() and all(
            outputs[key].dtype == expected[key].dtype and outputs[key].shape == expected[key].shape
            and np.array_equal(outputs[key].numpy(), expected[key].numpy()) for key in expected)
    except Exception as error:  # A TensorFlow without this internal API: the public call serves.
        log_line(f'Signature {name}: the direct call path is not available ({type(error).__name__}); '
                 'using the public signature call')
        return function
    if not same:
        log_line(f'Signature {name}: the direct call path gave other outputs than the public call; using the '
                 'public call')
        return function
    return flat_call


def folder_stamp(path):
    """The size and modification time of every file and folder in a version folder: it changes when a file is
    rewritten in place, which leaves the folders' own times as they were."""
    stamps = []
    for root, folders, files in os.walk(path):
        folders.sort()
        for name in ['.', *sorted(files)]:
            try:
                status = os.stat(os.path.join(root, name))
            except OSError:
                continue
            stamps.append((os.path.relpath(os.path.join(root, name), path), status.st_size, status.st_mtime_ns))
    return tuple(stamps)


class LoadFailure:
    """A version that failed to load: when to try it again, and the folder's stamp at the last try."""

    def __init__(self, stamp, retry_at):
        self.stamp = stamp
        self.attempts = 1
        self.retry_at = retry_at      # time.monotonic() of the next timed retry, or None: no more timed retries
        self.seen = stamp             # the stamp at the last poll, to tell a finished change from one in progress


class ModelRepository:
    """Holds the served version and its standby, and follows the base folder (see the module docstring).

    Request threads read `self.loaded`, a (served, standby) pair that is only ever replaced as a whole, once per
    request, and keep the ServedVersion they got to the end of the request. Only one thread calls refresh() (the
    poll thread; at start, the main thread before it), so the state changes in one place.
    """

    def __init__(self, base_path, model_name, keep_standby=True, metrics=None, max_load_retries=5,
                 load_retry_seconds=60.0):
        self.base_path = base_path
        self.model_name = model_name
        self.keep_standby = keep_standby
        self.metrics = metrics
        self.max_load_retries = max_load_retries
        self.load_retry_seconds = load_retry_seconds
        self.loaded = (None, None)
        # The version being read from disk right now (state LOADING), and versions that were loaded and then let go
        # (state END), as TF Serving reports them.
        self.loading = None
        self.ended = []
        # Versions that failed to load (version -> LoadFailure): retried on a timer and when their files change,
        # not on every poll.
        self.failed = {}
        self.stop_event = threading.Event()

    def find(self, version):
        """The loaded ServedVersion a request names (None: the served one), or None if it is not loaded."""
        served, standby = self.loaded
        if version is None or (served is not None and served.version == version):
            return served
        if standby is not None and standby.version == version:
            return standby
        return None

    def due(self, version):
        """Whether a version may be loaded now: it never failed, or its retry time came, or its files changed since
        the last failure and then stayed as they are for one poll."""
        failure = self.failed.get(version)
        if failure is None:
            return True
        if failure.retry_at is not None and time.monotonic() >= failure.retry_at:
            return True
        stamp = folder_stamp(os.path.join(self.base_path, str(version)))
        settled, failure.seen = stamp == failure.seen, stamp
        if stamp != failure.stamp and settled:
            # New files are a new export: it gets the whole number of retries again.
            failure.attempts = 0
            return True
        return False

    def refresh(self, load_standby=True):
        """Look at the folder once and bring the loaded versions in line with it. Never raises: an error is logged
        in one line and the versions loaded stay as they are."""
        try:
            self.refresh_once(load_standby)
        except Exception as error:  # The poll must go on; the next one sees the folder afresh.
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            log_line(f'error: cannot look at {self.base_path} for versions of model {self.model_name}: '
                     f'{type(error).__name__}: {first_line}; the loaded versions stay in service')

    def refresh_once(self, load_standby):
        on_disk = list_versions(self.base_path)
        # Failures of versions no longer there are forgotten: a folder that comes back is a new export.
        self.failed = {version: failure for version, failure in self.failed.items() if version in on_disk}
        served, standby = self.loaded
        if standby is not None and standby.version not in on_disk:
            self.set_loaded(served, None, ended=[standby])
            standby = None
        if served is not None and served.version not in on_disk and standby is not None:
            # The served version was retired: the standby takes over before anything is read from disk.
            self.set_loaded(standby, None, ended=[served])
            self.record_switch('version_removed')
            log_line(f'Version {served.version} of model {self.model_name} left {self.base_path}: serving version '
                     f'{standby.version}, which was loaded as the standby')
            served, standby = standby, None
        # Asked once per poll: whether a failed version's files have settled is told by comparing polls.
        due = {version for version in on_disk if self.due(version)}
        candidates = [version for version in on_disk if version in due]
        if candidates and (served is None or served.version not in on_disk or candidates[-1] > served.version):
            # A newer version, or the served one was retired with no standby: read the newest from disk.
            newest = self.load(candidates[-1])
            if newest is not None:
                keep = served if self.keep_standby and served is not None and served.version in on_disk else None
                self.set_loaded(newest, keep, ended=[served, standby])
                self.record_switch('newer_version' if served is None or newest.version > served.version
                                   else 'version_removed')
                log_line(f'Serving version {newest.version} of model {self.model_name} from {newest.path}')
        if self.keep_standby and load_standby:
            self.refresh_standby(on_disk, due)

    def refresh_standby(self, on_disk, due):
        """Keep the largest loadable version below the served one loaded, and nothing else."""
        served, standby = self.loaded
        if served is None:
            return
        below = [version for version in on_disk if version < served.version and version in due]
        wanted = below[-1] if below else None
        if standby is not None and standby.version == wanted:
            return
        loaded = self.load(wanted) if wanted is not None else None
        self.set_loaded(served, loaded, ended=[standby])
        if loaded is not None:
            log_line(f'Loaded version {loaded.version} of model {self.model_name} as the standby')

    def load(self, version):
        """Load one version, logging and remembering a failure; returns the ServedVersion or None."""
        path = os.path.join(self.base_path, str(version))
        self.loading = version
        started = time.perf_counter()
        try:
            served = load_version(self.base_path, version)
        except Exception as error:  # A broken export must not stop the server; it keeps serving what it has.
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.record_failure(version, first_line)
            served = None
        else:
            self.failed.pop(version, None)
        finally:
            self.loading = None
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.record_load(path, served is not None, seconds)
        if served is not None:
            log_line(f'Loaded version {version} of model {self.model_name} in {seconds:.2f} s')
        return served

    def record_failure(self, version, message):
        """Remember a failed load and log it in one line with what happens next."""
        path = os.path.join(self.base_path, str(version))
        failure = self.failed.get(version)
        stamp = folder_stamp(path)
        if failure is None:
            failure = self.failed[version] = LoadFailure(stamp, None)
        else:
            failure.attempts += 1
            failure.stamp = failure.seen = stamp
        # attempts counts the tries since the files last changed; the first is not a retry.
        retries_left = self.max_load_retries - (failure.attempts - 1)
        if retries_left > 0:
            failure.retry_at = time.monotonic() + self.load_retry_seconds
            next_step = f'retry {failure.attempts} of {self.max_load_retries} in {self.load_retry_seconds:g} s'
        else:
            failure.retry_at = None
            next_step = 'no more retries until its files change'
        log_line(f'Failed to load version {version} of model {self.model_name}: {message} ({next_step})')

    def set_loaded(self, served, standby, ended):
        """Replace the (served, standby) pair; the versions in `ended` that are not kept are reported as END."""
        kept = {version.version for version in (served, standby) if version is not None}
        gone = {version.version for version in ended if version is not None and version.version not in kept}
        self.ended = [version for version in self.ended if version not in kept | gone] + sorted(gone)
        self.loaded = (served, standby)

    def record_switch(self, reason):
        if self.metrics is not None:
            self.metrics.record_switch(self.model_name, reason)

    def poll(self, wait_seconds):
        """Refresh now (which loads the standby) and then every wait_seconds until stop() is called."""
        self.refresh()
        while not self.stop_event.wait(wait_seconds):
            self.refresh()

    def stop(self):
        self.stop_event.set()

    def version_states(self):
        """Return [(version, state)] newest first, as GET /v1/models/NAME reports them."""
        states = {version.version: 'AVAILABLE' for version in self.loaded if version is not None}
        loading = self.loading
        if loading is not None and loading not in states:
            states[loading] = 'LOADING'
        for version in self.ended:
            states.setdefault(version, 'END')
        return sorted(states.items(), reverse=True)
