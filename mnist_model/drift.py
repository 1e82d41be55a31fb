"""Drift of a served model: the reference profile of the data it was judged on, the tests, and a sliding window.

A version's profile (assets.extra/profile.json) has a section per signature, since the two classify different
pixels: serving_default's from the raw test digits and the model's probabilities (evaluate: compute_profile), and
predict_image's from 300 of those digits sent through it as PNG (export: complete_profile, where the preprocessing
exists). Each section holds, for each signal, what the model saw and said:

    digit        the predicted digit                  reference: its counts                    test: chi-square (2 x 10)
    confidence   the top-1 probability                reference: a sorted sample of 2 000      test: two-sample KS
    ink          mean pixel value / 255               of the pixels the model classified       test: two-sample KS
    height       rows holding ink (pixel > 127)       (after the signature's preprocessing)    test: two-sample KS
    gray         share of the visible pixels (> 25) that are mid-gray (25 to 230): blur, noise   two-sample KS
    slant        the ink's row-column covariance over its row variance: how far it leans       two-sample KS
    offset       distance in px of the ink's centre of mass from the centre (14, 14)            two-sample KS

Each signal's score is -log10 of its test's p-value over the last `window` inputs of one version and signature
(capped at 99): 5 means a difference as large as the window's would come by chance once in 100 000 windows of the
test data. The scores are computed at every `step`-th input. A version's alert starts when a score reaches its
threshold and ends when every score is back below END_FRACTION of its threshold. The thresholds, the window and the
signals were chosen on measurement with bench/drift_bench.py (docs/monitoring.md).

Only numpy and scipy here: the model server and the cluster's monitor process import this module, and the trainer's
evaluate step calls compute_profile; none of it needs TensorFlow.

Example:
    profile = compute_profile(x_test, probabilities)    # in evaluate: rows of 784 raw pixels, of 10 probabilities
    write_profile(export_dir, complete_profile(profile, classify_images))   # in export: assets.extra/profile.json
    monitor = DriftMonitor('mnist', on_alert=print)
    references = read_profile('mnist_model/1')
    monitor.observe(1, 'serving_default', references['serving_default'], pixels, probabilities)
    monitor.snapshot()                                   # {"versions": [{"version": 1, "alert": false, ...}]}
"""

import json
import math
import os
import threading

import numpy as np

PROFILE_FILE = os.path.join('assets.extra', 'profile.json')
# Format 2 keeps float32 precision; format 1 (6 significant digits) is still read, and watched at its precision.
PROFILE_FORMAT = 2
# Signals and the smallest score that starts an alert (-log10 of the p-value). Chosen on measurement
# (bench/drift_bench.py, docs/monitoring.md): over 20 windows of clean test digits, raw or as PNG, no score went above
# 3.4 (3 runs); the shifts of drift_shifts.py that hurt the model score 6 to 99 within 150 inputs.
THRESHOLDS = {'digit': 5.0, 'confidence': 5.0, 'ink': 5.0, 'height': 5.0, 'gray': 5.0, 'slant': 5.0, 'offset': 5.0}
SIGNALS = tuple(THRESHOLDS)
INPUT_SIGNALS = ('ink', 'height', 'gray', 'slant', 'offset')
# An alert ends when every score is below this share of its threshold, so that a score hovering at the threshold
# does not start and end alerts at every look.
END_FRACTION = 0.5
DEFAULT_WINDOW = 200
# The scores are computed again after this many more inputs: tests at every input would cost more than the model
# (seven tests take about 0.4 ms).
DEFAULT_STEP = 50
REFERENCE_SAMPLE = 2000
# Test digits the export sends through predict_image as PNG for that signature's reference: about 0.6 s of an
# export (2 ms a digit); a window of 200 against 300 reference values is tested as against 120 exact ones.
IMAGE_REFERENCE_DIGITS = 300
MAX_SCORE = 99.0
# Pixel levels: ink above INK_LEVEL counts for the extent; between GRAY_LOW and GRAY_HIGH a pixel is mid-gray.
INK_LEVEL = 127.5
GRAY_LOW, GRAY_HIGH = 25.0, 230.0


def as_stored(values):
    """Values at the precision a profile keeps them, float32, held in float64 for the tests. The window's values go
    through the same rounding as the reference's: a confidence of 0.9999996 stored as 1.0 but watched as 0.9999996
    looked like drift (a KS distance of 0.18, a score of 4.8, in every window of clean digits)."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def as_stored_in_format_1(values):
    """Values at the precision of a format 1 profile: 6 significant digits."""
    values = np.asarray(values, dtype=np.float64)
    magnitude = np.floor(np.log10(np.where(values == 0, 1.0, np.abs(values))))
    scale = 10.0 ** (5 - magnitude)
    return np.round(values * scale) / scale


class ProfileError(Exception):
    """A profile that is missing or cannot be used; its message is one line for the log."""


def input_statistics(pixels):
    """The input signals of each image, from 784 pixels 0-255 per row (what the model classified): a dict of
    float64 arrays, one value per row."""
    images = np.asarray(pixels, dtype=np.float32).reshape(-1, 28, 28)
    count = len(images)
    inked = images > INK_LEVEL
    rows_inked = inked.any(axis=2)
    visible = images > GRAY_LOW
    gray = visible & (images < GRAY_HIGH)
    mass = images.sum(axis=(1, 2), dtype=np.float64)
    safe_mass = np.maximum(mass, 1e-6)
    coordinates = np.arange(28, dtype=np.float64)
    row_profile = images.sum(axis=2, dtype=np.float64)
    column_profile = images.sum(axis=1, dtype=np.float64)
    centre_row = row_profile @ coordinates / safe_mass
    centre_column = column_profile @ coordinates / safe_mass
    # Covariance of row and column over the ink, divided by the row variance: the columns' shift per row, the
    # slant of the writing (positive when the top leans right).
    row_offsets = coordinates[None, :] - centre_row[:, None]
    column_offsets = coordinates[None, :] - centre_column[:, None]
    row_variance = np.einsum('nr,nr->n', row_profile, row_offsets ** 2) / safe_mass
    covariance = np.einsum('nr,nr->n', np.einsum('nrc,nc->nr', images, column_offsets), row_offsets) / safe_mass
    empty = mass < 1e-6
    return {
        'ink': mass / (784 * 255.0),
        'height': rows_inked.sum(axis=1).astype(np.float64),
        'gray': gray.sum(axis=(1, 2)) / np.maximum(visible.sum(axis=(1, 2)), 1),
        'slant': np.where(empty, 0.0, -covariance / np.maximum(row_variance, 1e-6)),
        'offset': np.where(empty, 0.0, np.hypot(centre_row - 14.0, centre_column - 14.0)),
    } if count else {name: np.zeros(0) for name in INPUT_SIGNALS}


def output_statistics(probabilities):
    """The output signals of each row of probabilities: predicted digit and top-1 confidence."""
    probabilities = np.asarray(probabilities, dtype=np.float32).reshape(-1, 10)
    return {'digit': probabilities.argmax(axis=1).astype(np.float64),
            'confidence': probabilities.max(axis=1).astype(np.float64)}


def compute_section(pixels, probabilities, sample_size=REFERENCE_SAMPLE, seed=0):
    """One signature's reference (a JSON-ready dict) from what the model classified (rows of 784 pixels) and said
    (rows of 10 probabilities): the count of each predicted digit, and for each continuous signal a sorted random
    sample of sample_size values (at float32 precision: as_stored)."""
    outputs = output_statistics(probabilities)
    count = len(outputs['digit'])
    if count == 0:
        raise ValueError('a drift profile needs at least one test example')
    chosen = np.random.default_rng(seed).permutation(count)[:sample_size]
    # Only the sampled rows' input signals are kept, so only theirs are computed (0.3 s for 10 000 rows).
    statistics = {**input_statistics(np.asarray(pixels).reshape(count, -1)[chosen]),
                  **{name: values[chosen] for name, values in outputs.items()}}
    return {
        'examples': int(count),
        'digit_counts': np.bincount(outputs['digit'].astype(np.int64), minlength=10).tolist(),
        # The shortest decimal text that reads back as the same float32 (as_stored): at most 9 digits.
        'samples': {name: [float(str(value)) for value in np.sort(statistics[name].astype(np.float32))]
                    for name in SIGNALS if name != 'digit'},
    }


def compute_profile(x_test, probabilities, image_digits=IMAGE_REFERENCE_DIGITS, seed=0):
    """The profile evaluate measures: the serving_default section from the raw test digits (n x 784, 0-255) and
    the model's probabilities, plus `image_digits` of those digits (a seeded random choice, compressed) from which
    the export computes the predict_image section once its preprocessing exists (complete_profile)."""
    import base64
    import io

    chosen = np.sort(np.random.default_rng(seed).permutation(len(x_test))[:image_digits])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, digits=np.asarray(x_test, dtype=np.uint8).reshape(-1, 28, 28)[chosen])
    return {'format': PROFILE_FORMAT,
            'signatures': {'serving_default': compute_section(x_test, probabilities, seed=seed)},
            'image_digits_npz_base64': base64.b64encode(buffer.getvalue()).decode('ascii')}


def complete_profile(profile, classify_images):
    """The profile with its predict_image section: classify_images(digits) takes n x 28 x 28 uint8 digits, sends
    them through predict_image as PNG and returns (the pixels its preprocessing made, n x 784; the probabilities).
    The digits themselves are left out of the result."""
    import base64
    import io

    completed = {key: value for key, value in profile.items() if key != 'image_digits_npz_base64'}
    with np.load(io.BytesIO(base64.b64decode(profile['image_digits_npz_base64'])), allow_pickle=False) as archive:
        digits = archive['digits']
    pixels, probabilities = classify_images(digits)
    completed['signatures'] = {**profile['signatures'],
                               'predict_image': compute_section(pixels, probabilities)}
    return completed


def write_profile(export_dir, profile):
    """Write the profile to <export_dir>/assets.extra/profile.json."""
    path = os.path.join(export_dir, PROFILE_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as file:
        json.dump(profile, file, separators=(',', ':'))


class Reference:
    """One signature's reference read back for testing: digit counts, each continuous signal's sorted sample, and
    the rounding of its format (`stored`), which the window's values get too."""

    def __init__(self, section, source, profile_format=PROFILE_FORMAT):
        self.stored = as_stored if profile_format == PROFILE_FORMAT else as_stored_in_format_1
        try:
            counts = np.asarray(section['digit_counts'], dtype=np.float64)
            samples = {name: np.sort(self.stored(section['samples'][name]))
                       for name in SIGNALS if name != 'digit'}
        except (KeyError, TypeError, ValueError) as error:
            raise ProfileError(f'{source}: not a drift profile ({type(error).__name__}: {error})') from None
        if counts.shape != (10,) or counts.sum() <= 0 or any(
                sample.ndim != 1 or len(sample) == 0 for sample in samples.values()):
            raise ProfileError(f'{source}: not a drift profile (digit counts or samples malformed)')
        self.digit_counts = counts
        self.samples = samples


def read_profile(version_dir):
    """{signature name: Reference} of a version folder's profile, or raise ProfileError (a version exported before
    profiles were written has none)."""
    path = os.path.join(version_dir, PROFILE_FILE)
    try:
        with open(path) as file:
            document = json.load(file)
    except FileNotFoundError:
        raise ProfileError(f'{path}: no drift profile (exported before profiles were written)') from None
    except (OSError, ValueError) as error:
        raise ProfileError(f'{path}: cannot read it ({error})') from None
    if not isinstance(document, dict) or document.get('format') not in (1, PROFILE_FORMAT) or not isinstance(
            document.get('signatures'), dict):
        raise ProfileError(f'{path}: not a drift profile of format 1 or {PROFILE_FORMAT}')
    return {name: Reference(section, f'{path} ({name})', document['format'])
            for name, section in document['signatures'].items()}


def score_of(p_value):
    """-log10 of a p-value, capped at MAX_SCORE (a p-value of 0 is as far as float64 goes)."""
    return min(MAX_SCORE, max(0.0, -math.log10(min(1.0, max(float(p_value), 1e-300)))))


def chi_square_score(values, reference_counts):
    """Score of the digits in `values` against the reference's digit counts: the chi-square test of homogeneity of
    the two samples (2 x 10 table), which allows for the reference being a sample too."""
    from scipy.special import chdtrc

    counts = np.bincount(np.asarray(values, dtype=np.int64), minlength=10)[:10].astype(np.float64)
    table = np.stack([counts, reference_counts])
    used = table.sum(axis=0) > 0
    table = table[:, used]
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return score_of(chdtrc(max(1, table.shape[1] - 1), statistic))


def ks_score(values, reference):
    """Score of `values` against a sorted reference sample: the two-sample Kolmogorov-Smirnov test. The statistic
    is exact, tied values included, and costs four binary searches of the window's values (the reference's own
    points need none: between two window values the empirical distribution of the window is flat). Its p-value
    comes from Kolmogorov's limiting distribution with Stephens' small-sample correction (scipy's exact kstwo took
    18 ms a test here, this 30 us; they agree within 2 %)."""
    from scipy.special import kolmogorov

    window = np.sort(np.asarray(values, dtype=np.float64))
    size, reference_size = len(window), len(reference)
    # At each window value: the window's distribution just after it (ties included) minus the reference's, and the
    # reference's just before it minus the window's just before it.
    above = np.searchsorted(window, window, side='right') / size - np.searchsorted(
        reference, window, side='right') / reference_size
    below = np.searchsorted(reference, window, side='left') / reference_size - np.searchsorted(
        window, window, side='left') / size
    distance = max(float(above.max()), float(below.max()), 0.0)
    root = math.sqrt(size * reference_size / (size + reference_size))
    return score_of(kolmogorov((root + 0.12 + 0.11 / root) * distance))


class Window:
    """The signal values of the last `size` inputs one version answered through one signature, and the scores of
    the last look at them."""

    def __init__(self, version, signature, reference, size, step):
        self.version = version
        self.signature = signature
        self.reference = reference
        self.size = size
        self.step = step
        self.values = {name: np.zeros(size) for name in SIGNALS}
        self.filled = 0          # inputs held, up to size
        self.position = 0        # where the next input goes in the ring
        self.seen = 0            # inputs observed in all
        self.scores = {}

    def add(self, statistics):
        """Put a batch of inputs' signal values (a dict of equal-length arrays) into the ring."""
        count = len(statistics['digit'])
        # Only the last `size` of a large batch stay.
        part = slice(max(0, count - self.size), count)
        indices = (self.position + np.arange(part.stop - part.start)) % self.size
        for name, ring in self.values.items():
            ring[indices] = statistics[name][part]
        self.position = (self.position + count) % self.size
        self.filled = min(self.size, self.filled + count)
        self.seen += count

    def compute_scores(self):
        """Test every signal over the window against the reference."""
        reference = self.reference
        self.scores = {name: chi_square_score(ring, reference.digit_counts) if name == 'digit'
                       else ks_score(ring, reference.samples[name]) for name, ring in self.values.items()}
        return self.scores


class DriftMonitor:
    """Sliding windows of the inputs one model's versions answered, per version and signature, their scores and
    each version's alert. observe() is called from one thread at a time, snapshot() from any. on_alert(message)
    receives one line when an alert starts or ends."""

    def __init__(self, model_name, window=DEFAULT_WINDOW, step=DEFAULT_STEP, thresholds=None, on_alert=None):
        if window < 2 or step < 1:
            raise ValueError(f'the drift window must hold at least 2 inputs and the step be at least 1, got '
                             f'{window} and {step}')
        self.model_name = model_name
        self.window = window
        self.step = step
        self.thresholds = dict(THRESHOLDS if thresholds is None else thresholds)
        self.on_alert = on_alert or (lambda message: None)
        self.windows = {}         # (version, signature) -> Window
        self.alerts = {}          # version -> (signature, inputs seen) when its alert started, None when calm
        self.lock = threading.Lock()

    def observe(self, version, signature, reference, pixels, probabilities):
        """Add inputs one version answered through one signature: the pixels the model classified (rows of 784,
        after the signature's preprocessing) and its probabilities (rows of 10), against that signature's
        Reference."""
        statistics = {name: reference.stored(values) for name, values in
                      {**input_statistics(pixels), **output_statistics(probabilities)}.items()}
        if len(statistics['digit']) != len(statistics['ink']):
            raise ValueError(f'{len(statistics["ink"])} rows of pixels and {len(statistics["digit"])} of '
                             'probabilities')
        if not len(statistics['digit']):
            return
        with self.lock:
            window = self.windows.get((version, signature))
            if window is None:
                window = self.windows[version, signature] = Window(version, signature, reference, self.window,
                                                                   self.step)
                self.alerts.setdefault(version, None)
            # The scores are computed whenever the count of inputs reaches a multiple of `step`, however the
            # inputs were batched: so they depend only on the order of the inputs (the local server and the
            # cluster's monitor fed the same requests report the same scores).
            start, count = 0, len(statistics['digit'])
            while start < count:
                end = min(count, start + self.step - window.seen % self.step)
                window.add({name: values[start:end] for name, values in statistics.items()})
                start = end
                if window.seen % self.step == 0 and window.filled == window.size:
                    window.compute_scores()
                    self.update_alert(version, window)

    def forget(self, version):
        """Drop a version's windows and alert: it is no longer served."""
        with self.lock:
            for key in [key for key in self.windows if key[0] == version]:
                del self.windows[key]
            self.alerts.pop(version, None)

    def update_alert(self, version, window):
        """Start the version's alert when a score of this window reaches its threshold; end it when every score
        of every window of the version is below END_FRACTION of its threshold."""
        over = [name for name, score in window.scores.items() if score >= self.thresholds[name]]
        if self.alerts[version] is None and over:
            self.alerts[version] = (window.signature, window.seen)
            described = ', '.join(f'{name} {window.scores[name]:.1f} >= {self.thresholds[name]:g}' for name in over)
            self.on_alert(f'drift alert started: model {self.model_name} version {version}, signature '
                          f'{window.signature}, after {window.seen} inputs: {described} (scores over the last '
                          f'{self.window} inputs)')
        elif self.alerts[version] is not None and all(
                score < END_FRACTION * self.thresholds[name]
                for other in self.windows.values() if other.version == version
                for name, score in other.scores.items()):
            self.alerts[version] = None
            self.on_alert(f'drift alert ended: model {self.model_name} version {version}: every score is below '
                          f'{END_FRACTION:g} x its threshold again (signature {window.signature}, after '
                          f'{window.seen} inputs)')

    def alert_of(self, version):
        with self.lock:
            return self.alerts.get(version) is not None

    def snapshot(self):
        """Every watched version's alert and, per signature, its window and scores, as a JSON-ready dict (what GET
        /monitoring/drift answers)."""
        with self.lock:
            versions = []
            for version in sorted(self.alerts, reverse=True):
                started = self.alerts[version]
                signatures = {window.signature: {
                    'inputs_seen': window.seen,
                    'inputs_in_window': window.filled,
                    'signals': {name: {'score': round(window.scores[name], 3) if name in window.scores else None,
                                       'threshold': self.thresholds[name]} for name in SIGNALS},
                } for window in self.windows.values() if window.version == version}
                versions.append({'version': version, 'alert': started is not None,
                                 'alert_started': None if started is None else
                                 {'signature': started[0], 'after_inputs': started[1]},
                                 'signatures': dict(sorted(signatures.items()))})
            return {'model_name': self.model_name, 'window': self.window, 'step': self.step,
                    'end_fraction': END_FRACTION, 'versions': versions}
