"""The fourth step: export the trained model as a SavedModel that TF Serving loads, with two signatures.

The export is a candidate: promote.py decides whether it becomes a served version. Serving contract of an exported
version (saved_model_cli show --all lists it):
    signature serving_default
        input   pixels         float32 [-1, 784]  raw grayscale 0-255, white digit on black, as in MNIST
        output  probabilities  float32 [-1, 10]
        output  digit          int64   [-1]
    signature predict_image
        input   image_bytes    string  [-1]       PNG or JPEG bytes (base64 {"b64": ...} over REST), gray/RGB/RGBA,
                                                  at most MAX_IMAGE_SIDE px a side (read from the header before
                                                  decoding), dark ink on light paper is inverted, strokes thickened
                                                  or thinned to MNIST's pen width
        outputs as serving_default
    signature image_pixels (for the drift monitor: what predict_image classifies)
        input   image_bytes    string  [-1]       as predict_image
        output  pixels         float32 [-1, 784]  the image after predict_image's preprocessing, 0-255
    assets.extra/run.json: hyperparameters, test accuracy and loss, training seconds, TensorFlow version, data
                           checksum; promote adds the version and the promotion decision with its evidence.
    assets.extra/profile.json: the drift monitor's reference, what the model saw and said on the test set (drift.py).
Scaling happens inside the model: clients send pixels as the images hold them and never divide by 255. The image
functions below are TensorFlow ops with explicit tf.cond and tf.while_loop, so they are traced without AutoGraph:
converting them took most of an export's time. The KFP components embed this module's source verbatim.

    python3 -c "import export; export.export('/tmp/model', '/tmp/metrics.json', '/tmp/export')"   # from mnist_model/
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

import drift

if TYPE_CHECKING:
    # As in load_data.py: the kfp annotations stay strings at run time.
    from kfp.components import InputPath, OutputPath

# MNIST's digits fill a 20 px box, drawn with strokes 1.9 to 3.3 px wide there (10th to 90th percentile of the
# training digits, by stroke_width below). A pen stroke scaled into that box can be far thinner (a 4 px pen
# across a 250 px digit becomes 0.3 px, a faint line the model has never seen) or thicker (a small digit drawn
# with a fat pen becomes a blob), so strokes outside STROKE_RANGE are brought to its nearer end. The ranges
# (1.9, 3.3), (2.4, 3.3), (2.0, 3.0) and (2.0, 3.6) read bench/draw_bench.py's drawings as well, within one
# drawing; this one keeps the re-drawn MNIST test digits best (0.975 against 0.9735-0.975). The width is set at
# WORK_BOX px, 4 times the box, where one step of 3x3 dilation or erosion changes it by 0.5 MNIST px.
MNIST_BOX, WORK_BOX = 20, 80
# The largest image predict_image reads, in px a side: 4096x4096 takes about 0.5 GB and 0.8 s to read, and
# images are read one at a time. A JPEG's size is in its frame header, after at most this many segments.
MAX_IMAGE_SIDE = 4096
MAX_JPEG_SEGMENTS = 1000
STROKE_RANGE = (2.0, 3.3)
MAX_WIDTH_STEPS = 8


def crop_and_fit(ink, box):
    """Crop to the ink's bounding box and resize its longer side to `box` px, keeping the aspect ratio."""
    inked_rows = tf.where(tf.reduce_any(ink > 0.1 * 255.0, axis=1))[:, 0]
    inked_columns = tf.where(tf.reduce_any(ink > 0.1 * 255.0, axis=0))[:, 0]
    top, bottom = tf.reduce_min(inked_rows), tf.reduce_max(inked_rows) + 1
    left, right = tf.reduce_min(inked_columns), tf.reduce_max(inked_columns) + 1
    height, width = tf.cast(bottom - top, tf.float32), tf.cast(right - left, tf.float32)
    scale = box / tf.maximum(height, width)
    new_height = tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32))
    new_width = tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))
    fitted = tf.image.resize(ink[top:bottom, left:right, None], [new_height, new_width], antialias=True)
    return tf.clip_by_value(fitted[:, :, 0], 0.0, 255.0)


def stroke_width(ink):
    """Mean stroke width in px: twice the ink's area over its outline's length (a stroke of width w and
    length l has area w*l and an outline of about 2*l), both measured on the gray levels."""
    share = tf.pad(ink / 255.0, [[1, 1], [1, 1]])
    down = share[1:, :-1] - share[:-1, :-1]
    across = share[:-1, 1:] - share[:-1, :-1]
    outline = tf.reduce_sum(tf.sqrt(down * down + across * across + 1e-12))
    return 2.0 * tf.reduce_sum(share) / tf.maximum(outline, 1e-6)


def dilate(image, step):
    """One step of 3x3 dilation of a [1, height, width, 1] image."""
    # Alternating a square and a cross keeps round pen tips round instead of growing them into squares.
    square = tf.nn.max_pool2d(image, 3, 1, 'SAME')
    cross = tf.maximum(tf.nn.max_pool2d(image, [1, 3], 1, 'SAME'), tf.nn.max_pool2d(image, [3, 1], 1, 'SAME'))
    return tf.where(step % 2 == 0, square, cross)


def set_stroke_width(ink):
    """Dilate or erode the strokes of a digit fitted to WORK_BOX px until their width is in STROKE_RANGE."""
    ink = ink * 255.0 / tf.maximum(tf.reduce_max(ink), 1e-6)
    # Room for the widest dilation on every side.
    ink = tf.pad(ink, [[MAX_WIDTH_STEPS + 1, MAX_WIDTH_STEPS + 1]] * 2)[None, :, :, None]
    width = stroke_width(ink[0, :, :, 0]) * MNIST_BOX / WORK_BOX
    low, high = STROKE_RANGE
    # Each step widens or narrows a stroke by 2 px at WORK_BOX, which is 0.5 px in the 20 px box.
    steps_to_widen = tf.clip_by_value(tf.round((low - width) / 0.5), 0.0, MAX_WIDTH_STEPS)
    steps_to_narrow = tf.clip_by_value(tf.round((width - high) / 0.5), 0.0, MAX_WIDTH_STEPS)

    def change_width(step, image):
        image = tf.cond(step < steps_to_widen, lambda: dilate(image, step),
                        lambda: -dilate(-image, step))
        return step + 1.0, image

    _, ink = tf.while_loop(lambda step, image: step < steps_to_widen + steps_to_narrow, change_width,
                           [tf.constant(0.0), ink])
    return ink[0, :, :, 0]


def centre(digit):
    """Place a digit of at most 20x20 px in 28x28 with its centre of mass at the centre (14, 14), as MNIST
    does; return it as 784 pixels."""
    height, width = tf.shape(digit)[0], tf.shape(digit)[1]
    mass = tf.maximum(tf.reduce_sum(digit), 1e-6)
    centre_row = tf.reduce_sum(digit * tf.cast(tf.range(height), tf.float32)[:, None]) / mass
    centre_column = tf.reduce_sum(digit * tf.cast(tf.range(width), tf.float32)[None, :]) / mass
    pad_top = tf.clip_by_value(tf.cast(tf.round(14.0 - centre_row), tf.int32), 0, 28 - height)
    pad_left = tf.clip_by_value(tf.cast(tf.round(14.0 - centre_column), tf.int32), 0, 28 - width)
    placed = tf.pad(digit, [[pad_top, 28 - height - pad_top], [pad_left, 28 - width - pad_left]])
    return tf.reshape(placed, [784])


def read_bytes(image_bytes, position, count):
    """`count` bytes of image_bytes from `position` as int64 values, zeros past its end (a truncated header then
    reads as a size of 0, which the check refuses)."""
    length = tf.cast(tf.strings.length(image_bytes), tf.int64)
    window = tf.strings.substr(image_bytes, tf.minimum(tf.cast(position, tf.int64), length),
                               tf.constant(count, tf.int64))
    values = tf.cast(tf.io.decode_raw(window, tf.uint8), tf.int64)
    return tf.pad(values, [[0, count - tf.shape(values)[0]]])


def jpeg_size(image_bytes):
    """(width, height) from a JPEG's frame header (SOFn), found by walking the segments before it; (0, 0) if
    there is none within MAX_JPEG_SEGMENTS segments."""
    def walk(position, segments, width, height):
        header = read_bytes(image_bytes, position, 9)
        marker = header[1]
        is_frame = (header[0] == 0xFF) & (marker >= 0xC0) & (marker <= 0xCF) & (marker != 0xC4) & (
            marker != 0xC8) & (marker != 0xCC)
        # A fill byte (0xFF) or a marker without a length (SOI, TEMn, RSTn) takes 1 or 2 bytes, the others
        # carry their length; anything else (no 0xFF, the scan or the end before a frame) ends the walk.
        step = tf.where(marker == 0xFF, tf.constant(1, tf.int64),
                        tf.where((marker == 0x01) | ((marker >= 0xD0) & (marker <= 0xD8)), tf.constant(2, tf.int64),
                                 2 + header[2] * 256 + header[3]))
        stop = is_frame | (header[0] != 0xFF) | (marker == 0xD9) | (marker == 0xDA)
        return (tf.where(stop, tf.constant(-1, tf.int64), position + step),
                segments + 1,
                tf.where(is_frame, header[7] * 256 + header[8], width),
                tf.where(is_frame, header[5] * 256 + header[6], height))

    _, _, width, height = tf.while_loop(
        lambda position, segments, width, height: (position >= 0) & (segments < MAX_JPEG_SEGMENTS), walk,
        [tf.constant(2, tf.int64), tf.constant(0), tf.constant(0, tf.int64), tf.constant(0, tf.int64)])
    return width, height


def png_size(image_bytes):
    """(width, height) from a PNG's IHDR chunk, which the format requires to come first."""
    header = read_bytes(image_bytes, 16, 8)
    width = ((header[0] * 256 + header[1]) * 256 + header[2]) * 256 + header[3]
    height = ((header[4] * 256 + header[5]) * 256 + header[6]) * 256 + header[7]
    return width, height


def check_image(image_bytes):
    """Assertions that the bytes are a PNG or JPEG whose header says at most MAX_IMAGE_SIDE px a side: decoding
    a small file can take gigabytes (an 80 KB PNG of 8000x8000 zeros decodes to 2.3 GB), so the size is read
    from the header before anything is decoded."""
    is_png = tf.strings.substr(image_bytes, 0, 8) == b'\x89PNG\r\n\x1a\n'
    is_jpeg = tf.io.is_jpeg(image_bytes)
    known = tf.debugging.Assert(is_png | is_jpeg, [
        'image_bytes: not a PNG or JPEG image (predict_image reads PNG and JPEG)'])
    with tf.control_dependencies([known]):
        width, height = tf.cond(is_png, lambda: png_size(image_bytes), lambda: jpeg_size(image_bytes))
    fits = (width >= 1) & (height >= 1) & (width <= MAX_IMAGE_SIDE) & (height <= MAX_IMAGE_SIDE)
    message = tf.strings.format(
        'image_bytes: the image header says {}x{} px; predict_image reads images of 1 to ' + str(MAX_IMAGE_SIDE)
        + ' px a side', [width, height], summarize=-1)
    return [tf.debugging.Assert(fits, [message])]


def to_mnist_pixels(image_bytes):
    """Decode one image and normalise it the way MNIST was made, returning 784 pixels of 0-255."""
    with tf.control_dependencies(check_image(image_bytes)):
        # The decoders below read these bytes, so they run only once the size check has passed.
        image_bytes = tf.identity(image_bytes)
    # JPEG has no alpha channel: add an opaque one, so that every image is RGBA from here on.
    rgba = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.pad(tf.io.decode_jpeg(image_bytes, channels=3), [[0, 0], [0, 0], [0, 1]], constant_values=255),
        lambda: tf.io.decode_png(image_bytes, channels=4))
    rgba = tf.cast(rgba, tf.float32)
    alpha = rgba[:, :, 3] / 255.0
    # Transparent parts count as white paper.
    gray = tf.image.rgb_to_grayscale(rgba[:, :, :3])[:, :, 0] * alpha + 255.0 * (1.0 - alpha)
    border = tf.concat([gray[0, :], gray[-1, :], gray[:, 0], gray[:, -1]], axis=0)
    background = tf.reduce_mean(border)
    # MNIST is a light digit on a dark background: invert dark ink on light paper.
    gray = tf.cond(background > 127.5, lambda: 255.0 - gray, lambda: gray)
    background = tf.minimum(background, 255.0 - background)
    ink = tf.nn.relu(gray - background)
    ink = ink * 255.0 / tf.maximum(tf.reduce_max(ink), 1e-6)
    # Fit the digit to the working size, bring its strokes to MNIST's width there, then fit it to MNIST's box.
    return tf.cond(tf.reduce_any(ink > 0.1 * 255.0),
                   lambda: centre(crop_and_fit(set_stroke_width(crop_and_fit(ink, WORK_BOX)), MNIST_BOX)),
                   lambda: tf.zeros([784], tf.float32))

# The serving functions are TensorFlow ops with explicit tf.cond and tf.while_loop, so they are traced without


def serving_signatures(model):
    """The two serving functions of the model, traced once each, by signature name."""
    @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32, name='pixels')], autograph=False)
    def serve_pixels(pixels):
        probabilities = model(pixels, training=False)
        return {'probabilities': probabilities, 'digit': tf.argmax(probabilities, axis=1, output_type=tf.int64)}

    # What predict_image classifies; a signature of its own for the drift monitor (docs/monitoring.md).
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')], autograph=False)
    def image_pixels(image_bytes):
        # One image at a time (map_fn runs 10 at once in a graph): a batch of large images costs the memory of one.
        return {'pixels': tf.map_fn(to_mnist_pixels, image_bytes, fn_output_signature=tf.TensorSpec([784], tf.float32),
                                    parallel_iterations=1)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')], autograph=False)
    def serve_image(image_bytes):
        return serve_pixels(image_pixels(image_bytes)['pixels'])

    return {'serving_default': serve_pixels.get_concrete_function(),
            'predict_image': serve_image.get_concrete_function(),
            'image_pixels': image_pixels.get_concrete_function()}


def write_drift_profile(export_dir, profile, signatures):
    """assets.extra/profile.json, the drift monitor's reference (drift.py, docs/monitoring.md): evaluate measured the
    raw pixels; what predict_image makes of test digits sent as PNG is measured here, where its preprocessing is."""
    def classify_images(digits):
        pixels = signatures['image_pixels'](tf.stack([tf.io.encode_png(digit[..., None]) for digit in digits]))
        pixels = pixels['pixels']
        return pixels.numpy(), signatures['serving_default'](pixels)['probabilities'].numpy()

    drift.write_profile(export_dir, drift.complete_profile(profile, classify_images))


def write_run_record(export_dir, train_info, metrics):
    """assets.extra/run.json: what was trained, on which data, and how it scored."""
    os.makedirs(os.path.join(export_dir, 'assets.extra'), exist_ok=True)
    run_info = {'hyperparameters': train_info['hyperparameters'], 'accuracy': metrics['accuracy'],
                'loss': metrics['loss'], 'test_examples': metrics['test_examples'],
                'train_seconds': train_info['train_seconds'], 'tensorflow_version': tf.__version__,
                'data_source': train_info['data_source'], 'data_sha256': train_info['data_sha256']}
    with open(os.path.join(export_dir, 'assets.extra', 'run.json'), 'w') as file:
        json.dump(run_info, file, indent=2)


def export(model_path: InputPath('Model'), metrics_path: InputPath('JSON'), export_dir: OutputPath('SavedModel'),
           trained_model=None):
    """Export the model as a SavedModel in the folder export_dir, with the signatures serving_default and
    predict_image (see the module docstring) and assets.extra/run.json. The export is a candidate: promote()
    decides whether it becomes a served version. trained_model is the model train() returned when the steps run in
    one process (mnist.run); without it the model is loaded from model_path."""
    model = (trained_model if trained_model is not None
             else keras.models.load_model(os.path.join(model_path, 'model.keras')))
    with open(os.path.join(model_path, 'train.json')) as file:
        train_info = json.load(file)
    with open(metrics_path) as file:
        metrics = json.load(file)
    # The module carries only the model's variables; the signatures are the two functions, traced once each. (As
    # tf.function attributes of the module they would be traced a second time when saved: 1.3 s more per export.)
    serving = tf.Module()
    serving.model = model
    signatures = serving_signatures(model)
    tf.saved_model.save(serving, export_dir, signatures=signatures)
    if 'profile' in metrics:
        write_drift_profile(export_dir, metrics['profile'], signatures)
    write_run_record(export_dir, train_info, metrics)
