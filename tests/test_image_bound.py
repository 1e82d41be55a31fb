"""Tests of the image size bound inside the exported predict_image signature (mnist.export): an image whose header
says it is larger than 4096 px a side is refused before it is decoded, so TF Serving and KServe serving the SavedModel
are protected as well as the local server; normal PNG and JPEG images still read as before.

    python3 -m pytest -q tests/test_image_bound.py
"""
import io
import json
import os
import subprocess
import sys
import zlib

import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO

TEST_DIGIT = os.path.join(REPO, 'mnist_model', 'test_data', '3.png')
SIZE_REFUSAL = 'image_bytes: the image header says {}x{} px; predict_image reads images of 1 to 4096 px a side'


def png_of_zeros(width, height):
    """A grayscale PNG of zero pixels, written by hand: zlib shrinks rows of zeros about 1000 times."""
    def chunk(kind, data):
        return len(data).to_bytes(4, 'big') + kind + data + zlib.crc32(kind + data).to_bytes(4, 'big')

    compressor = zlib.compressobj(9)
    row = b'\0' * (width + 1)
    body = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + bytes([8, 0, 0, 0, 0])
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', body) + chunk(b'IEND', b'')


def jpeg_of(path, **options):
    with Image.open(path) as image:
        encoded = io.BytesIO()
        image.convert('RGB').save(encoded, 'JPEG', quality=95, **options)
    return encoded.getvalue()


def with_frame_size(jpeg, width, height):
    """The JPEG with its frame header (SOF0 or SOF2) patched to claim width x height."""
    jpeg = bytearray(jpeg)
    start = max(jpeg.find(b'\xff\xc0'), jpeg.find(b'\xff\xc2'))
    jpeg[start + 5:start + 9] = height.to_bytes(2, 'big') + width.to_bytes(2, 'big')
    return bytes(jpeg)


@pytest.fixture(scope='module')
def predict_image(model_base_dir):
    return tf.saved_model.load(os.path.join(model_base_dir, '1')).signatures['predict_image']


def refusal(predict_image, image):
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        predict_image(image_bytes=tf.constant([image]))
    (line,) = [line for line in raised.value.message.splitlines() if line.startswith('assertion failed: ')]
    return line[len('assertion failed: ['):-1]


def test_normal_images_still_read(predict_image):
    with open(TEST_DIGIT, 'rb') as png_file:
        png = png_file.read()
    images = [png, jpeg_of(TEST_DIGIT), jpeg_of(TEST_DIGIT, progressive=True),
              # 60 KB of metadata before the frame header, as a camera's EXIF block puts it.
              jpeg_of(TEST_DIGIT, exif=b'Exif\0\0' + b'\0' * 60000),
              png_of_zeros(4096, 4096)]
    digits = predict_image(image_bytes=tf.constant(images))['digit'].numpy().tolist()
    assert digits[:4] == [3, 3, 3, 3]
    assert len(digits) == 5, 'the largest allowed size is read, too'


@pytest.mark.parametrize('make, message', [
    (lambda: png_of_zeros(8000, 8000), SIZE_REFUSAL.format(8000, 8000)),
    (lambda: png_of_zeros(4097, 10), SIZE_REFUSAL.format(4097, 10)),
    (lambda: png_of_zeros(10, 4097), SIZE_REFUSAL.format(10, 4097)),
    (lambda: png_of_zeros(10, 10)[:20], SIZE_REFUSAL.format(10, 0)),  # cut inside the header
    (lambda: with_frame_size(jpeg_of(TEST_DIGIT), 8000, 8000), SIZE_REFUSAL.format(8000, 8000)),
    (lambda: with_frame_size(jpeg_of(TEST_DIGIT, progressive=True), 20, 5000), SIZE_REFUSAL.format(20, 5000)),
    # Segments without a frame header: the walk stops after 1000 segments instead of reading them all.
    (lambda: b'\xff\xd8' + b'\xff\xe1\x00\x02' * 200000, SIZE_REFUSAL.format(0, 0)),
    (lambda: b'GIF89a' + bytes(100), 'image_bytes: not a PNG or JPEG image (predict_image reads PNG and JPEG)'),
    (lambda: b'', 'image_bytes: not a PNG or JPEG image (predict_image reads PNG and JPEG)'),
])
def test_oversized_or_unknown_images_are_refused_before_decoding(predict_image, make, message):
    assert refusal(predict_image, make()) == message


# Runs in a fresh process, so that its peak memory is the model's and this call's alone.
MEASURE = r'''
import json, os, sys, time
import tensorflow as tf
def peak_kb():
    with open('/proc/self/status') as status:
        return int(next(line for line in status if line.startswith('VmHWM')).split()[1])
signature = tf.saved_model.load(sys.argv[1]).signatures['predict_image']
with open(sys.argv[2], 'rb') as image_file:
    image = image_file.read()
signature(image_bytes=tf.constant([tf.io.encode_png(tf.zeros([28, 28, 1], tf.uint8)).numpy()]))
before, started = peak_kb(), time.perf_counter()
try:
    signature(image_bytes=tf.constant([image]))
    refused = False
except tf.errors.InvalidArgumentError:
    refused = True
print(json.dumps({'refused': refused, 'seconds': time.perf_counter() - started,
                  'growth_mb': (peak_kb() - before) / 1024}))
'''


def test_a_small_png_of_8000x8000_px_is_refused_quickly_without_memory_growth(model_base_dir, tmp_path):
    image_path = tmp_path / 'zeros.png'
    image_path.write_bytes(png_of_zeros(8000, 8000))
    assert image_path.stat().st_size < 90_000
    process = subprocess.run([sys.executable, '-c', MEASURE, os.path.join(model_base_dir, '1'), str(image_path)],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout.strip().splitlines()[-1])
    # Decoded, this image took 2.3 GB and 5 s (bench/image_bound_bench.py); refused, it takes well under 1 MB.
    assert result['refused'] and result['growth_mb'] < 50 and result['seconds'] < 2, result
