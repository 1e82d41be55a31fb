"""Measure what oversized images cost the exported predict_image signature: time and peak memory growth of one call.

Each case runs in a fresh process that loads the SavedModel (the artefact TF Serving and KServe load), warms it up
with a 28x28 PNG, then sends one image: PNGs of zero pixels whose header says 8000x8000 or 16000x16000 (about 80 KB
and 300 KB of bytes), a JPEG whose frame header was patched to 8000x8000, and a legitimate 4096x4096 PNG (the largest
size the signature reads). It prints the reply (the digit, or the refusal), the call's wall time and the growth of
the process's peak resident memory (VmHWM) during the call; the median over --runs runs.

    python3 bench/image_bound_bench.py --model_dir mnist_model/1
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import zlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Runs in the child process: load the model, warm up, call once, report.
CHILD = r'''
import json, os, sys, time
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import tensorflow as tf

def peak_kb():
    with open('/proc/self/status') as status:
        return int(next(line for line in status if line.startswith('VmHWM')).split()[1])

model_dir, image_path = sys.argv[1:]
signature = tf.saved_model.load(model_dir).signatures['predict_image']
signature(image_bytes=tf.constant([tf.io.encode_png(tf.zeros([28, 28, 1], tf.uint8)).numpy()]))
with open(image_path, 'rb') as image_file:
    image = image_file.read()
before, started = peak_kb(), time.perf_counter()
try:
    reply = 'digit %d' % signature(image_bytes=tf.constant([image]))['digit'].numpy()[0]
except tf.errors.InvalidArgumentError as error:
    lines = [line for line in error.message.splitlines() if line.startswith('assertion failed')] or ['?']
    reply = 'refused: ' + lines[0][len('assertion failed: '):][:120]
print(json.dumps({'reply': reply, 'seconds': time.perf_counter() - started, 'growth_mb': (peak_kb() - before) / 1024,
                  'bytes': len(image)}))
'''


def png_of_zeros(width, height):
    """A grayscale PNG of zero pixels, written by hand so that huge sizes cost little: zlib shrinks zeros ~1000x."""
    def chunk(kind, data):
        return len(data).to_bytes(4, 'big') + kind + data + zlib.crc32(kind + data).to_bytes(4, 'big')

    row = b'\0' * (width + 1)
    compressor = zlib.compressobj(9)
    body = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + bytes([8, 0, 0, 0, 0])
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', body) + chunk(b'IEND', b'')


def jpeg_claiming(width, height):
    """A small real JPEG whose frame header (SOF0) is patched to claim width x height."""
    import tensorflow as tf

    image = bytearray(tf.io.encode_jpeg(tf.zeros([16, 16, 1], tf.uint8)).numpy())
    start = image.index(b'\xff\xc0')
    image[start + 5:start + 9] = height.to_bytes(2, 'big') + width.to_bytes(2, 'big')
    return bytes(image)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model_dir', required=True, help='a version folder holding the SavedModel')
    parser.add_argument('--runs', type=int, default=3, help='runs per case; the median is printed (default: 3)')
    parser.add_argument('--work_dir', default='/tmp/image-bound-bench', help='where the images are written')
    parser.add_argument('--only', default='', help='run only the cases whose name contains this text')
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    cases = {'PNG 8000x8000 zeros': lambda: png_of_zeros(8000, 8000),
             'PNG 16000x16000 zeros': lambda: png_of_zeros(16000, 16000),
             'JPEG header 8000x8000': lambda: jpeg_claiming(8000, 8000),
             'PNG 4096x4096 zeros (allowed)': lambda: png_of_zeros(4096, 4096)}
    for name, make in cases.items():
        if args.only not in name:
            continue
        path = os.path.join(args.work_dir, name.split(' (')[0].replace(' ', '-') + '.img')
        with open(path, 'wb') as image_file:
            image_file.write(make())
        results = []
        for _ in range(args.runs):
            process = subprocess.run([sys.executable, '-c', CHILD, args.model_dir, path], capture_output=True,
                                     text=True, timeout=600)
            if process.returncode != 0:
                results.append({'reply': f'process failed: {process.stderr.strip().splitlines()[-1:]}',
                                'seconds': float('nan'), 'growth_mb': float('nan'), 'bytes': 0})
                continue
            results.append(json.loads(process.stdout.strip().splitlines()[-1]))
        print(f'{name:32} {results[0]["bytes"] / 1024:7.1f} KB  '
              f'{statistics.median(result["seconds"] for result in results):7.3f} s  '
              f'peak +{statistics.median(result["growth_mb"] for result in results):7.1f} MB  {results[0]["reply"]}',
              flush=True)


if __name__ == '__main__':
    main()
