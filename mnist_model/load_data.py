"""The first step: read MNIST, check it and write it as one npz file for the steps after it.

It reads a Keras-layout npz (x_train y_train x_test y_test), a folder of the four MNIST IDX files (gzipped or not), or
an http(s) URL of an npz (the pipeline's data_url), checks that it is fit to train and judge on, and writes an
uncompressed npz of uint8 arrays plus the source and its sha256. The KFP components embed this module's source verbatim (mnist_pipeline.py, mnist_pipeline_v2.py).

    python3 -c "import load_data; load_data.load_data('data/mnist.npz', '/tmp/dataset.npz')"   # from mnist_model/
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import urllib.request
import zipfile
from typing import TYPE_CHECKING

import numpy as np

import evidence

if TYPE_CHECKING:
    # The step functions' InputPath/OutputPath annotations stay strings at run time: the pipeline scripts resolve them
    # where kfp is loaded, and the trainer itself runs without importing kfp (41 MB less memory).
    from kfp.components import OutputPath

KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
# The file names MNIST is distributed under, in the order of KEYS.
IDX_NAMES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
             't10k-labels-idx1-ubyte')


def not_mnist(name, reason):
    return ValueError(f'{name}: not an MNIST npz file or IDX folder ({reason}); expected a Keras-layout .npz '
                      f'with the arrays {", ".join(KEYS)}, or a folder of the four MNIST IDX files')


def read_npz(content, name):
    """The four arrays of a Keras-layout npz file's bytes."""
    # An npz file is a zip archive. Anything else would reach numpy's pickle check and fail with a message about
    # pickled data that says nothing to someone who passed, say, a text file.
    if content[:2] != b'PK':
        if content[:3] == b'\x00\x00\x08':
            raise not_mnist(name, 'one IDX file: pass the folder that holds all four')
        if content[:2] == b'\x1f\x8b':
            raise not_mnist(name, 'a gzip file; if it is one IDX file, pass the folder that holds all four')
        raise not_mnist(name, 'not a zip archive')
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as npz:
            missing = [key for key in KEYS if key not in npz.files]
            if missing:
                raise ValueError(f'{name}: missing arrays {", ".join(missing)} (expected {", ".join(KEYS)})')
            return [npz[key] for key in KEYS]
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise not_mnist(name, f'a broken zip archive: {error}') from None
    except ValueError as error:
        if str(error).startswith(name):
            raise
        raise not_mnist(name, f'an unreadable array: {error}') from None


def read_idx(path):
    """One IDX file of unsigned bytes as an array, and its bytes."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as file:
            content = file.read()
    except (OSError, EOFError) as error:
        raise ValueError(f'{path}: cannot read ({error})') from None
    # IDX header: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions, then the sizes.
    if len(content) < 4 or content[:3] != b'\x00\x00\x08' or content[3] not in (1, 3):
        raise ValueError(f'{path}: not an IDX file of unsigned bytes')
    ndim = content[3]
    header_size = 4 + 4 * ndim
    shape = [int.from_bytes(content[4 + 4 * index:8 + 4 * index], 'big') for index in range(ndim)]
    values = np.frombuffer(content, dtype=np.uint8, offset=min(header_size, len(content)))
    if len(content) < header_size or values.size != int(np.prod(shape)):
        raise ValueError(f'{path}: truncated or corrupt IDX file (header says shape {shape})')
    return values.reshape(shape), content


def find_idx(folder, name):
    """The path of one of the four IDX files in a folder, under any of the names it is distributed under."""
    for candidate in (name, name + '.gz', name.replace('-idx', '.idx'), name.replace('-idx', '.idx') + '.gz'):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    raise FileNotFoundError(f'{folder}: no {name}[.gz] file (an IDX folder needs all four MNIST files)')


def read_source(data):
    """The four arrays from a URL, an IDX folder or an npz file, and the sha256 of what was read."""
    if data.startswith(('http://', 'https://')):
        try:
            with urllib.request.urlopen(data, timeout=120) as response:
                content = response.read()
        except OSError as error:
            raise ValueError(f'cannot download {data} ({error})') from None
        return read_npz(content, data), hashlib.sha256(content).hexdigest()
    if os.path.isdir(data):
        arrays, digest = [], hashlib.sha256()
        for name in IDX_NAMES:
            array, content = read_idx(find_idx(data, name))
            arrays.append(array)
            digest.update(content)
        return arrays, digest.hexdigest()
    if os.path.isfile(data):
        with open(data, 'rb') as file:
            content = file.read()
        return read_npz(content, data), hashlib.sha256(content).hexdigest()
    raise FileNotFoundError(f'{data}: no such file or folder')


def load_data(data: str, dataset_path: OutputPath('npz')):
    """Read MNIST from a Keras-layout npz, a folder of the four IDX files or an http(s) URL of an npz, validate
    it and write it to dataset_path as an uncompressed npz of uint8 arrays (x_train y_train x_test y_test) plus
    the source and its sha256. The checks (evidence.check_dataset) refuse data unfit to train and judge on: images
    that are not uint8 28x28, labels that are not digits 0-9, a test split without every digit, and test images that
    are exact copies of training images. Raises ValueError or FileNotFoundError with a one-line message."""
    (x_train, y_train, x_test, y_test), checksum = read_source(data)
    evidence.check_dataset(x_train, y_train, x_test, y_test, data)
    os.makedirs(os.path.dirname(os.path.abspath(dataset_path)), exist_ok=True)
    # An open file stops np.savez from appending ".npz" to a path KFP chose.
    with open(dataset_path, 'wb') as file:
        np.savez(file, x_train=x_train, y_train=y_train.astype(np.uint8), x_test=x_test,
                 y_test=y_test.astype(np.uint8), source=np.array(data), source_sha256=np.array(checksum))
