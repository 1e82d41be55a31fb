"""The evidence the promotion gate decides on: data fit to judge on, the serving contract, and the candidate and the
served model measured together, through `serving_default`, on the same test images.

Every number the gate acts on is measured here, never read from a record: `measure` loads a SavedModel folder the
way a server does (tf.saved_model.load) and runs its `serving_default` signature on the test split, and `judge`
compares two such measurements (the candidate and the champion, the version a server serves now) example by example
and digit by digit. Around them: `check_dataset` (what load_data must refuse), `fingerprint_test_split` (which test set
a decision was made on), `signature_contract` and `contract_difference` (what clients of the served version rely on).
`gate` runs them in the gate's order in one call. Every failure is a ValueError with one line naming the problem.

The module holds only the standard library and numpy at module level and imports TensorFlow inside the functions
that need it, because the KFP steps embed its source verbatim and run it in the stock tensorflow/tensorflow image.

Example (from mnist_model/, with versions 1 and 2 in serving/ and a candidate exported to /tmp/candidate):

    import numpy as np
    import evidence
    with np.load('data/mnist.npz', allow_pickle=False) as data:
        test_split = data['x_test'], data['y_test']
    verdict = evidence.gate('/tmp/candidate', [(2, 'serving/2'), (1, 'serving/1')], test_split, evidence.Rule())
    print(verdict.reason or 'promote', evidence.describe_evidence(verdict.record))
"""
import hashlib
import math
import time
from typing import NamedTuple, Optional

import numpy as np

DIGITS = 10
IMAGE_SHAPE = (28, 28)
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
# Test images per call of serving_default: 2000 rows of float32 pixels are 6 MB, and larger batches were not faster.
BATCH_SIZE = 2000
# What the gate feeds serving_default, as the export contract says: raw pixels 0-255, one row per image.
FED_INPUT = ('float32', (-1, PIXELS))
# The cross-entropy clipping of Keras (and of mnist.evaluate), so that measured losses equal the trainer's.
LOSS_EPSILON = 1e-7


class Rule(NamedTuple):
    """The gate's settings (the promote flags of the same names).

    min_accuracy       the floor: a candidate below it is declined, in [0, 1]
    min_improvement    a candidate must reach the champion's accuracy plus this, >= 0 (0: a tie promotes)
    max_digit_drop     a candidate better overall is still declined when one digit's accuracy falls by more than
                       this (a fraction: 0.02 is 2 points), in [0, 1]. 0.03: see docs/promotion.md.
    min_test_examples  the gate refuses to decide on fewer test images than this (>= 1). 1000: the quick demo's
                       test slice, the smallest set the demo decides on.
    force_export       promote whatever the rule says; the record says what it would have said.
    """
    min_accuracy: float = 0.0
    min_improvement: float = 0.0
    max_digit_drop: float = 0.03
    min_test_examples: int = 1000
    force_export: bool = False


class Fingerprint(NamedTuple):
    """Which test set a measurement was made on: its size and the sha256 of its images and labels."""
    examples: int
    sha256: str


class Measurement(NamedTuple):
    """One model measured through serving_default on one test set (see measure)."""
    name: str                  # how decision lines name the model: 'the candidate', 'version 3'
    folder: str
    test_set: Fingerprint
    accuracy: float            # the fraction of test images whose `digit` equals the label
    loss: Optional[float]      # mean cross-entropy of `probabilities`; None without that output
    per_digit: tuple           # DIGITS accuracies, one per true digit
    predictions: np.ndarray    # int64 [examples], the digit served for each test image
    correct: np.ndarray        # bool [examples], whether that digit is the label
    seconds: float             # load and run time


# ------------------------------------------------------------------------------------------------------- the data

def check_split(images, labels, split, name):
    """Raise ValueError unless images are uint8 [N, 28, 28] and labels N integers 0-9 (split: 'train' or 'test',
    name: the data's source, for the message)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise ValueError(f'{name}: {split} images must be uint8 of shape (N, 28, 28), got {images.dtype} '
                         f'{images.shape}')
    if labels.ndim != 1 or labels.dtype.kind not in 'iu':
        raise ValueError(f'{name}: {split} labels must be a 1-D integer array, got {labels.dtype} {labels.shape}')
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f'{name}: {len(images)} {split} images but {len(labels)} labels')
    outside = int(np.count_nonzero((labels < 0) | (labels > DIGITS - 1)))
    if outside:
        raise ValueError(f'{name}: {outside} {split} labels are not digits 0-9 (found {labels.min()}..{labels.max()})')


def missing_digits(labels):
    """The digits 0-9 that have no example among labels, as a list."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=DIGITS)
    return [digit for digit in range(DIGITS) if counts[digit] == 0]


def row_keys(images):
    """A 64-bit key per image from its pixels (a fixed random linear hash of its bytes; equal images get equal
    keys). Vectorised: 60 000 images take about 30 ms here, a hashlib digest per row about 120 ms."""
    rows = np.ascontiguousarray(images).reshape(len(images), -1)
    padding = (-rows.shape[1]) % 8
    if padding:
        rows = np.pad(rows, ((0, 0), (0, padding)))
    words = rows.view(np.uint64)
    # Odd multipliers, fixed so that keys are the same in every process; the sum wraps around modulo 2**64.
    multipliers = np.random.default_rng(2026).integers(1, 2 ** 63, size=words.shape[1], dtype=np.uint64) | 1
    return (words * multipliers).sum(axis=1, dtype=np.uint64)


def count_leaked(x_train, x_test):
    """How many test images are exact copies of a training image. Keys find the candidates; every candidate pair is
    then compared pixel by pixel, so a key collision never counts as a copy."""
    train_keys, test_keys = row_keys(x_train), row_keys(x_test)
    suspects = np.flatnonzero(np.isin(test_keys, train_keys))
    if len(suspects) == 0:
        return 0
    by_key = {}
    for index in np.flatnonzero(np.isin(train_keys, test_keys[suspects])):
        by_key.setdefault(int(train_keys[index]), []).append(index)
    flat_train, flat_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    return sum(bool((flat_train[by_key[int(test_keys[index])]] == flat_test[index]).all(axis=1).any())
               for index in suspects)


def check_dataset(x_train, y_train, x_test, y_test, name):
    """Raise ValueError (one line, naming name and the count) unless the data is fit to train and judge on: images
    uint8 [N, 28, 28], labels integers 0-9, every digit present in the test split, and no test image an exact copy
    of a training image (a model that memorised its training set would score on it what it never learned)."""
    check_split(x_train, y_train, 'train', name)
    check_split(x_test, y_test, 'test', name)
    absent = missing_digits(y_test)
    if absent:
        raise ValueError(f'{name}: the test split has no example of digit {", ".join(map(str, absent))}; a model '
                         'is judged on all ten digits')
    leaked = count_leaked(np.asarray(x_train), np.asarray(x_test))
    if leaked:
        raise ValueError(f'{name}: {count_text(leaked)} of {count_text(len(x_test))} test images are exact copies of '
                         'training images; a test split must hold images the model has not trained on')


def fingerprint_test_split(x_test, y_test):
    """The Fingerprint of these test images and labels: their count and the sha256 of their shapes and bytes (labels as
    uint8, as load_data stores them), the same for the same data wherever it was read from."""
    images = np.ascontiguousarray(x_test, dtype=np.uint8)
    labels = np.ascontiguousarray(y_test).astype(np.uint8)
    digest = hashlib.sha256(repr((images.shape, labels.shape)).encode())
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    return Fingerprint(len(labels), digest.hexdigest())


def count_text(count):
    """A count with a space between thousands, as the decision lines write it: '10 000'."""
    return f'{count:,}'.replace(',', ' ')


def describe_test_split(test_set):
    """The test set as the decision line names it: '10 000 test images, sha256 1a2b3c4d'."""
    return f'{count_text(test_set.examples)} test images, sha256 {test_set.sha256[:8]}'


# ------------------------------------------------------------------------------------------ the serving contract

def signature_contract(saved_model_dir):
    """The signatures a SavedModel offers its clients, read from saved_model.pb without loading the model:
    {signature: {'inputs': {name: (dtype, shape)}, 'outputs': {name: (dtype, shape)}}}, dtype a name such as
    'float32', shape a tuple with -1 for a free size or None for any shape. TensorFlow's internal signatures
    (names starting with '__') are left out. ValueError if the file is missing or not a SavedModel."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    path = f'{saved_model_dir.rstrip("/")}/saved_model.pb'
    saved_model = saved_model_pb2.SavedModel()
    try:
        with open(path, 'rb') as proto_file:
            saved_model.ParseFromString(proto_file.read())
    except OSError as error:
        raise ValueError(f'{saved_model_dir}: cannot read saved_model.pb ({error.strerror or error})') from None
    except DecodeError:
        raise ValueError(f'{path}: not a SavedModel (the file does not parse)') from None
    if not saved_model.meta_graphs:
        raise ValueError(f'{path}: not a SavedModel (it holds no graph)')

    def tensors(infos):
        return {name: (tf.as_dtype(info.dtype).name,
                       None if info.tensor_shape.unknown_rank else tuple(dim.size for dim in info.tensor_shape.dim))
                for name, info in infos.items()}

    return {name: {'inputs': tensors(signature.inputs), 'outputs': tensors(signature.outputs)}
            for name, signature in saved_model.meta_graphs[0].signature_def.items() if not name.startswith('__')}


def describe_tensor(dtype, shape):
    """'float32[-1,784]'; 'string[any shape]' for a shape of unknown rank."""
    return f'{dtype}[{"any shape" if shape is None else ",".join(map(str, shape))}]'


def shapes_compatible(first, second):
    """Whether two contract shapes can hold the same tensors: same rank and equal sizes where both are fixed (-1
    matches any size, an unknown rank any shape)."""
    if first is None or second is None:
        return True
    return len(first) == len(second) and all(a == b or -1 in (a, b) for a, b in zip(first, second))


def tensor_difference(kind, served, candidate, served_name):
    """The first difference between the served and the candidate tensors of one kind ('input' or 'output') of one
    signature, as a phrase, or ''. Every served tensor must be there with its dtype and a compatible shape; an extra
    input is a difference too (a client of the served version does not send it), an extra output is not."""
    for name in sorted(served):
        if name not in candidate:
            return f'{kind} {name} ({describe_tensor(*served[name])} in {served_name}) is missing in the candidate'
        (served_dtype, served_shape), (dtype, shape) = served[name], candidate[name]
        if dtype != served_dtype or not shapes_compatible(served_shape, shape):
            return (f'{kind} {name} is {describe_tensor(dtype, shape)} in the candidate, '
                    f'{describe_tensor(served_dtype, served_shape)} in {served_name}')
    extra = sorted(set(candidate) - set(served)) if kind == 'input' else []
    if extra:
        return f'input {extra[0]} of the candidate is not an input in {served_name}'
    return ''


def contract_difference(served, candidate, served_name='the served version'):
    """'' when the candidate's contract (signature_contract) offers everything clients of the served one use: every
    served signature, with the same input names, the same output names among its outputs, the same dtypes and
    compatible shapes. Otherwise one line naming the first difference, e.g. 'signature serving_default: input
    pixels is float32[-1,100] in the candidate, float32[-1,784] in version 3'. serving_default, the signature
    most clients call, is compared first, then the others by name."""
    for signature in sorted(served, key=lambda name: (name != 'serving_default', name)):
        if signature not in candidate:
            offered = ', '.join(sorted(candidate)) or 'none'
            return f'signature {signature} of {served_name} is missing in the candidate (it offers: {offered})'
        for kind, key in (('input', 'inputs'), ('output', 'outputs')):
            difference = tensor_difference(kind, served[signature][key], candidate[signature][key], served_name)
            if difference:
                return f'signature {signature}: {difference}'
    return ''


# ------------------------------------------------------------------------------------------------ the measurement

def first_line(error):
    """The first line of an exception's text, or its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__


def load_serving_default(saved_model_dir):
    """Load a SavedModel and return (its loaded object, the serving_default function, the name of its one input);
    ValueError naming the folder when it cannot be loaded or its serving_default cannot take the test pixels."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(saved_model_dir)
    except Exception as error:  # Anything TensorFlow raises here means the same: no server could load it either.
        raise ValueError(f'{saved_model_dir}: cannot be loaded as a SavedModel ({first_line(error)})') from None
    function = loaded.signatures.get('serving_default')
    if function is None:
        raise ValueError(f'{saved_model_dir}: has no serving_default signature (it offers: '
                         f'{", ".join(sorted(loaded.signatures)) or "none"})')
    inputs = {name: (spec.dtype, None if spec.shape.rank is None else tuple(-1 if size is None else size
                                                                           for size in spec.shape.as_list()))
              for name, spec in function.structured_input_signature[1].items()}
    dtype, shape = next(iter(inputs.values())) if len(inputs) == 1 else (None, None)
    if dtype is None or not dtype.is_floating or not shapes_compatible(shape, FED_INPUT[1]):
        taken = ', '.join(f'{name} {describe_tensor(value[0].name, value[1])}' for name, value in inputs.items())
        raise ValueError(f'{saved_model_dir}: serving_default takes {taken or "no input"}, not one input of '
                         f'{describe_tensor(*FED_INPUT)} pixels 0-255')
    return loaded, function, next(iter(inputs))


def checked_outputs(outputs, rows, saved_model_dir):
    """The (digits, probabilities) of one batch's serving_default outputs as numpy arrays (either may be None, not
    both); ValueError naming the folder when `digit` is not `rows` integers or `probabilities` not rows x 10 finite
    numbers."""
    digits = probabilities = None
    if 'digit' in outputs:
        digits = np.asarray(outputs['digit'])
        if digits.shape != (rows,) or digits.dtype.kind not in 'iu':
            raise ValueError(f'{saved_model_dir}: serving_default output digit is {digits.dtype}{list(digits.shape)} '
                             f'for {rows} images, not {rows} integers')
    if 'probabilities' in outputs:
        probabilities = np.asarray(outputs['probabilities'])
        if probabilities.shape != (rows, DIGITS) or probabilities.dtype.kind != 'f':
            raise ValueError(f'{saved_model_dir}: serving_default output probabilities is {probabilities.dtype}'
                             f'{list(probabilities.shape)} for {rows} images, not float[{rows},{DIGITS}]')
        if not np.all(np.isfinite(probabilities)):
            raise ValueError(f'{saved_model_dir}: serving_default output probabilities holds values that are not '
                             'finite numbers')
    if digits is None and probabilities is None:
        raise ValueError(f'{saved_model_dir}: serving_default has neither a digit nor a probabilities output '
                         f'(outputs: {", ".join(sorted(outputs)) or "none"})')
    return digits, probabilities


def run_serving_default(function, input_name, images, saved_model_dir):
    """Run serving_default on uint8 images in batches of BATCH_SIZE and return (the digits it serves, int64 [N];
    its probabilities, float [N, 10], or None without that output). Predictions are the `digit` output, what clients
    get; a model without it is judged on the argmax of `probabilities`."""
    import tensorflow as tf

    digits, probabilities = [], []
    dtype = function.structured_input_signature[1][input_name].dtype
    for start in range(0, len(images), BATCH_SIZE):
        batch = images[start:start + BATCH_SIZE].reshape(-1, PIXELS)
        try:
            # Raw 0-255 pixels as float32 (the contract), cast when a model takes another float type.
            outputs = function(**{input_name: tf.cast(batch.astype(np.float32), dtype)})
        except Exception as error:  # A model that fails on the test images fails on clients' requests too.
            raise ValueError(f'{saved_model_dir}: serving_default failed on the test images '
                             f'({first_line(error)})') from None
        batch_digits, batch_probabilities = checked_outputs(outputs, len(batch), saved_model_dir)
        digits.append(batch_digits if batch_digits is not None else batch_probabilities.argmax(axis=1))
        probabilities.append(batch_probabilities)
    joined = None if any(part is None for part in probabilities) else np.concatenate(probabilities)
    return np.concatenate(digits).astype(np.int64), joined


def check_test_split(images, labels):
    """Raise ValueError unless the test split can be measured on: uint8 [N, 28, 28] images (or [N, 784] rows), N
    labels 0-9, and every digit present (each digit gets an accuracy)."""
    images = np.asarray(images)
    check_split(images.reshape(len(images), *IMAGE_SHAPE) if images.ndim == 2 and images.shape[1] == PIXELS
                else images, labels, 'test', 'the test split')
    absent = missing_digits(labels)
    if absent:
        raise ValueError(f'the test split has no example of digit {", ".join(map(str, absent))}: every digit gets an '
                         'accuracy')


def summarise(labels, predictions, probabilities):
    """(accuracy, loss or None, per-digit accuracies) of predictions against labels; the loss is the mean clipped
    cross-entropy of the probabilities, as mnist.evaluate computes it."""
    labels = np.asarray(labels, dtype=np.int64)
    correct = predictions == labels
    per_digit = np.bincount(labels[correct], minlength=DIGITS) / np.bincount(labels, minlength=DIGITS)
    loss = None
    if probabilities is not None:
        chosen = probabilities[np.arange(len(labels)), labels].astype(np.float64)
        loss = float(-np.mean(np.log(np.clip(chosen, LOSS_EPSILON, 1.0))))
    return float(np.mean(correct)), loss, tuple(float(value) for value in per_digit)


def measure(saved_model_dir, images, labels, name=None):
    """Load the SavedModel in saved_model_dir as a server does and measure what it serves: run serving_default on the
    test images (uint8 [N, 28, 28], fed as float32 [N, 784] raw 0-255, the export contract) and return a Measurement
    (accuracy of its `digit` output, loss of its `probabilities`, per-digit accuracy, the predictions and the seconds
    taken). name: how decision lines call it (default: the folder). ValueError in one line, naming the folder and the
    reason, when the model cannot be loaded or run or its outputs are not digits and probabilities for every image."""
    started = time.perf_counter()
    check_test_split(images, labels)
    images = np.asarray(images)
    loaded, function, input_name = load_serving_default(saved_model_dir)
    predictions, probabilities = run_serving_default(function, input_name, images, saved_model_dir)
    del loaded  # Kept until here: the signature function needs the loaded object's variables.
    accuracy, loss, per_digit = summarise(labels, predictions, probabilities)
    test_set = fingerprint_test_split(images.reshape(len(images), *IMAGE_SHAPE), labels)
    return Measurement(name or saved_model_dir, saved_model_dir, test_set, accuracy, loss, per_digit, predictions,
                       predictions == np.asarray(labels, dtype=np.int64), time.perf_counter() - started)


def find_champion(versions, images, labels):
    """Measure the served version: versions are (number, folder) pairs, newest first (the order in which a server
    tries them); the first that loads and runs is the champion. Returns (its number, its Measurement, one line per
    newer version passed over because it cannot be loaded or run); (None, None, lines) when none can."""
    check_test_split(images, labels)  # A bad test split is the data's fault, not a version's.
    passed_over = []
    for version, folder in versions:
        try:
            return version, measure(folder, images, labels, name=f'version {version}'), passed_over
        except ValueError as error:
            passed_over.append(f'version {version} is not a baseline (a server cannot serve it either): {error}')
    return None, None, passed_over


# ------------------------------------------------------------------------------------------------------ the rule

def check_rule(rule):
    """Raise ValueError (one line) unless every setting of the Rule is a number in its range."""
    ranges = {'min_accuracy': (0.0, 1.0), 'min_improvement': (0.0, math.inf), 'max_digit_drop': (0.0, 1.0),
              'min_test_examples': (1, math.inf)}
    if not isinstance(rule.force_export, bool):
        raise ValueError(f'--force_export must be true or false, got {rule.force_export!r}')
    for setting, (low, high) in ranges.items():
        value = getattr(rule, setting)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or not math.isfinite(value):
            allowed = f'>= {low}' if high == math.inf else f'in [{low:g}, {high:g}]'
            raise ValueError(f'--{setting} must be a number {allowed}, got {value!r}')
    if rule.min_test_examples != int(rule.min_test_examples):
        raise ValueError(f'--min_test_examples must be an integer, got {rule.min_test_examples!r}')


def check_measurement(measurement):
    """Raise ValueError unless the measurement's numbers are finite and in range: a NaN compares false with
    everything and would let any rule pass, so it is never evidence."""
    numbers = {'accuracy': measurement.accuracy, **{f'accuracy on digit {digit}': value
                                                     for digit, value in enumerate(measurement.per_digit)}}
    for what, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f'{measurement.name}: its {what} is {value!r}, not a number in [0, 1]')
    if len(measurement.per_digit) != DIGITS:
        raise ValueError(f'{measurement.name}: {len(measurement.per_digit)} per-digit accuracies, not {DIGITS}')
    if measurement.loss is not None and not (isinstance(measurement.loss, (int, float))
                                             and math.isfinite(measurement.loss) and measurement.loss >= 0):
        raise ValueError(f'{measurement.name}: its loss is {measurement.loss!r}, not a finite number >= 0')


def summary_of(measurement):
    """The JSON record of one Measurement: name, accuracy, loss, per-digit accuracies, seconds (6 decimals)."""
    return {'name': measurement.name, 'accuracy': round(measurement.accuracy, 6),
            'loss': None if measurement.loss is None else round(measurement.loss, 6),
            'per_digit': [round(value, 6) for value in measurement.per_digit],
            'seconds': round(measurement.seconds, 3)}


def compare(candidate, champion):
    """The paired evidence of candidate against champion, as a JSON dict: whether every prediction is the same, how
    many changed, how many test images the candidate gets right that the champion got wrong (fixed) and the reverse
    (broken), each digit's change in accuracy and the largest drop."""
    if champion.test_set != candidate.test_set:
        raise ValueError(f'the candidate and {champion.name} were measured on different test sets '
                         f'({describe_test_split(candidate.test_set)}; {describe_test_split(champion.test_set)})')
    changes = [cand - champ for cand, champ in zip(candidate.per_digit, champion.per_digit)]
    worst = int(np.argmin(changes))
    return {'identical_predictions': bool(np.array_equal(candidate.predictions, champion.predictions)),
            'changed_predictions': int(np.count_nonzero(candidate.predictions != champion.predictions)),
            'fixed': int(np.count_nonzero(candidate.correct & ~champion.correct)),
            'broken': int(np.count_nonzero(champion.correct & ~candidate.correct)),
            'digit_changes': [round(change, 6) for change in changes],
            'largest_digit_drop': {'digit': worst, 'drop': round(max(0.0, -changes[worst]), 6)}}


def refusal(candidate, champion, rule, contract_change, paired):
    """Why the rule declines the candidate, as a phrase ('' when it promotes); the checks run in the order the
    docstring of judge gives."""
    examples = candidate.test_set.examples
    if examples < rule.min_test_examples:
        return (f'it was measured on only {count_text(examples)} test images; the gate decides on at least '
                f'{count_text(int(rule.min_test_examples))} (--min_test_examples)')
    if contract_change:
        return f'it breaks the serving contract: {contract_change}'
    if candidate.accuracy < rule.min_accuracy:
        return f'its test accuracy {candidate.accuracy:.4f} is below the floor {rule.min_accuracy:g} (--min_accuracy)'
    if champion is None:
        return ''
    if paired['identical_predictions']:
        return (f'its predictions equal those of {champion.name} on all {count_text(examples)} test images: it '
                'serves nothing new (identical)')
    # Accuracies are counts over the same N images: a tolerance far below 1/N keeps float rounding out of ties.
    if candidate.accuracy < champion.accuracy + rule.min_improvement - 1e-9:
        margin = f' + {rule.min_improvement:g} (--min_improvement)' if rule.min_improvement else ''
        return f'its test accuracy {candidate.accuracy:.4f} is below {champion.accuracy:.4f} of {champion.name}{margin}'
    drop = paired['largest_digit_drop']
    if drop['drop'] > rule.max_digit_drop + 1e-9:
        digit = drop['digit']
        return (f'it is better overall ({candidate.accuracy:.4f} against {champion.accuracy:.4f} of {champion.name}) '
                f'but its accuracy on digit {digit} falls from {champion.per_digit[digit]:.4f} to '
                f'{candidate.per_digit[digit]:.4f}, by more than {rule.max_digit_drop:g} (--max_digit_drop)')
    return ''


def judge(candidate, champion, rule=Rule(), contract_change=''):
    """Decide on evidence: candidate and champion are Measurements on the same test set (champion None when no
    version is served), contract_change the contract_difference ('' when none). Returns (reason, record): reason is
    '' to promote, else the phrase that says why not; record is the JSON-ready decision record for run.json, the run
    pages and the report. The candidate is declined, in this order of checks, when
      - it was measured on fewer than rule.min_test_examples test images,
      - it breaks the served version's serving contract,
      - its accuracy is below rule.min_accuracy,
      - its predictions equal the champion's on every test image (identical),
      - its accuracy is below the champion's + rule.min_improvement,
      - it is better overall but one digit's accuracy falls by more than rule.max_digit_drop.
    rule.force_export promotes regardless: the reason returned is '', the record's decision 'forced' and its reason
    what the rule would have said. ValueError for settings out of range, measurements with numbers that are not
    finite or out of range, or measured on different test sets."""
    check_rule(rule)
    for measurement in (candidate, champion):
        if measurement is not None:
            check_measurement(measurement)
    paired = compare(candidate, champion) if champion is not None else None
    reason = refusal(candidate, champion, rule, contract_change, paired)
    record = {'decision': decision_of(reason, rule), 'reason': reason,
              'test_set': candidate.test_set._asdict(), 'rule': rule._asdict(), 'contract_difference': contract_change,
              'candidate': summary_of(candidate), 'champion': summary_of(champion) if champion is not None else None,
              **(paired or {'identical_predictions': None})}
    return ('' if rule.force_export else reason), record


def decision_of(reason, rule):
    """The record's decision: 'forced' under force_export, else 'declined' with a reason and 'promoted' without."""
    return 'forced' if rule.force_export else 'declined' if reason else 'promoted'


class Verdict(NamedTuple):
    """What gate decided and on which evidence."""
    reason: str                        # '' to promote, else why not (a phrase: 'its test accuracy ... is below ...')
    record: dict                       # judge's JSON record, for run.json, the run pages and the report
    candidate: Optional[Measurement]   # None when the candidate could not be measured
    champion_version: Optional[int]    # the version it was compared with; None when none could be measured
    champion: Optional[Measurement]
    passed_over: list                  # one line per newer version that could not be measured (find_champion)


def unmeasured_record(error, contract_change, rule, champion, test_set):
    """(reason, record) for a candidate that measure refused: declined as breaking the contract when it does (a
    model taking other inputs cannot be fed the test pixels), else as a model that cannot be measured."""
    reason = (f'it breaks the serving contract: {contract_change}' if contract_change
              else f'it cannot be measured: {error}')
    return reason, {'decision': decision_of(reason, rule), 'reason': reason, 'test_set': test_set._asdict(),
                    'rule': rule._asdict(), 'contract_difference': contract_change, 'candidate': None,
                    'measurement_error': str(error),
                    'champion': summary_of(champion) if champion is not None else None, 'identical_predictions': None}


def gate(candidate_dir, versions, test_split, rule=Rule(), candidate=None):
    """The whole gate in one call: read the candidate's contract (ValueError if candidate_dir holds no SavedModel),
    measure the champion (find_champion over versions, (number, folder) pairs newest first), compare the contracts,
    measure the candidate on test_split, an (images, labels) pair, and judge. A candidate that loads but cannot be
    measured is declined (force_export still promotes it, and the record says why it was not measured). candidate:
    a Measurement of the same candidate from an earlier call, not measured again (the decision under the promotion
    lock, against a version served meanwhile). Returns a Verdict."""
    images, labels = test_split
    check_rule(rule)
    candidate_contract = signature_contract(candidate_dir)
    version, champion, passed_over = find_champion(versions, images, labels)
    change = ('' if champion is None else
              contract_difference(signature_contract(champion.folder), candidate_contract, champion.name))
    if candidate is None:
        try:
            candidate = measure(candidate_dir, images, labels, name='the candidate')
        except ValueError as error:
            test_set = fingerprint_test_split(np.asarray(images).reshape(len(images), *IMAGE_SHAPE), labels)
            reason, record = unmeasured_record(error, change, rule, champion, test_set)
            return Verdict('' if rule.force_export else reason, record, None, version, champion, passed_over)
    reason, record = judge(candidate, champion, rule, change)
    return Verdict(reason, record, candidate, version, champion, passed_over)


# ------------------------------------------------------------------------------------------------ for the reader

def recorded_fingerprint(run_info):
    """The Fingerprint a version's run.json (parsed, any JSON value) says it was judged on, at
    ['promotion']['evidence']['test_set'] where promote stores judge's record; None when it is missing or malformed
    (a file is never trusted to hold what it should)."""
    path = ('promotion', 'evidence', 'test_set')
    value = run_info
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, dict):
        return None
    examples, sha256 = value.get('examples'), value.get('sha256')
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0 or not isinstance(sha256, str) \
            or len(sha256) != 64 or any(character not in '0123456789abcdef' for character in sha256):
        return None
    return Fingerprint(examples, sha256)


def changed_test_split(test_set, served_run_info, served_name):
    """A phrase saying that the served version was last judged on another test set than test_set, or has no record
    of one ('' when it was judged on the same): served_run_info is its parsed run.json, whatever it holds. Only ever
    shown, never decided on."""
    recorded = recorded_fingerprint(served_run_info)
    if recorded is None:
        return f'{served_name} has no record of the test set it was judged on'
    if recorded == test_set:
        return ''
    return f'{served_name} was last judged on another test set ({describe_test_split(recorded)})'


def describe_evidence(record):
    """One line of the paired evidence in a judge record: 'candidate 0.9812, version 3 0.9731 on 10 000 test
    images, sha256 1a2b3c4d: 120 fixed, 39 broken, digit 7 down 0.0050 at most'."""
    test_set = describe_test_split(Fingerprint(**record['test_set']))
    candidate, champion = record['candidate'], record['champion']
    if candidate is None:
        return f'the candidate could not be measured on {test_set}'
    if champion is None:
        return f'candidate {candidate["accuracy"]:.4f} on {test_set}; no version served to compare with'
    drop = record['largest_digit_drop']
    worst = (f'digit {drop["digit"]} down {drop["drop"]:.4f} at most' if drop['drop'] > 0
             else 'no digit worse')
    return (f'candidate {candidate["accuracy"]:.4f}, {champion["name"]} {champion["accuracy"]:.4f} on {test_set}: '
            f'{record["fixed"]} fixed, {record["broken"]} broken, {worst}')


def per_digit_table(record):
    """The per-digit accuracies of a judge record as a markdown table (for the KFP run pages, the console and the
    report): a row per digit and one for all; a column for the champion and one for the candidate (each if
    measured), and the change when both were."""
    champion, candidate = record['champion'], record['candidate']
    columns = []
    if champion is not None:
        columns.append((champion['name'], [*champion['per_digit'], champion['accuracy']], '.4f'))
    if candidate is not None:
        columns.append(('candidate', [*candidate['per_digit'], candidate['accuracy']], '.4f'))
    if len(columns) == 2:
        columns.append(('change', [new - old for old, new in zip(columns[0][1], columns[1][1])], '+.4f'))
    if not columns:
        return ''
    lines = ['| digit | ' + ' | '.join(title for title, _, _ in columns) + ' |', '|---' * (len(columns) + 1) + '|']
    for row, label in enumerate([*map(str, range(DIGITS)), 'all']):
        lines.append(f'| {label} | ' + ' | '.join(format(values[row], style) for _, values, style in columns) + ' |')
    return '\n'.join(lines)
