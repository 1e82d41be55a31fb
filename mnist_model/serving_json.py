"""TF Serving's JSON predict API: request bodies to checked numpy arrays, output arrays to reply bodies.

Row format: {"signature_name"?, "instances": [one value or one {input: value} object per example]} is answered with
{"predictions": [...]}; columnar format: {"inputs": value or {input: value}} with {"outputs": ...}. String inputs
are JSON strings or {"b64": "..."}; string outputs whose name ends in `_bytes` go out as {"b64": ...}, as TF
Serving does. Numbers are checked against the signature's dtype and shape before any TensorFlow call, so a
malformed request fails on its own and never inside a batch of other clients' requests.

Compressed bodies are inflated by `gunzip`, within the body limit whatever the compression ratio.

Example:
    request = read_predict_request(served, orjson.loads(body))
    reply_bytes = encode_predict_reply(outputs, request.row_format)
"""

import base64
import binascii
import json
import re
import typing

import zlib

import numpy as np
import orjson

DEFAULT_SIGNATURE = 'serving_default'
# Output dtypes that orjson writes straight from numpy arrays, float32 with the digits float32 holds (0.9428256,
# not 0.9428256154060364) as TF Serving prints them.
FAST_DTYPES = {np.dtype(name) for name in ('float32', 'float64', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16',
                                           'uint32', 'uint64', 'bool')}


# The JSON extension tokens TF Serving accepts; orjson refuses them.
NON_FINITE_TOKEN = re.compile(rb'NaN|Infinity')
# A gzip body is read in pieces this large, so that each member's leftover input (which zlib copies) stays small
# and many small members cost time in proportion to their bytes; and it may hold at most this many members.
GZIP_PIECE_BYTES = 4096
MAX_GZIP_MEMBERS = 1000
# Nesting deeper than this is refused in string inputs of unknown rank (numpy arrays have at most 64 dimensions).
MAX_STRING_NESTING = 32


class RequestError(Exception):
    """An error answered to the client as {"error": message} with an HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class PredictRequest(typing.NamedTuple):
    signature_name: str
    arrays: dict          # input name -> numpy array matching the signature's dtype and shape
    row_format: bool


def gunzip(data, limit):
    """Decompress a gzip body (one or more members) into at most `limit` bytes, or raise RequestError. Decompressing
    stops at the limit, so a small body that would inflate to gigabytes (a decompression bomb) costs no more than a
    body at the limit; the input is fed in GZIP_PIECE_BYTES pieces, so the time grows with the body's size alone,
    however many members it holds (at most MAX_GZIP_MEMBERS)."""
    view = memoryview(data)
    parts, size, position, members = [], 0, 0, 0
    decompressor, pending = None, b''
    while pending or position < len(view):
        if not pending:
            pending = view[position:position + GZIP_PIECE_BYTES]
            position += len(pending)
        if decompressor is None:
            members += 1
            if members > MAX_GZIP_MEMBERS:
                raise RequestError(400, f'the gzip request body has more than {MAX_GZIP_MEMBERS} members')
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            part = decompressor.decompress(pending, limit + 1 - size)
        except zlib.error as error:
            raise RequestError(400, f'the gzip request body cannot be decompressed: {error}') from None
        size += len(part)
        if size > limit:
            raise RequestError(413, f'the gzip request body decompresses to more than the limit of {limit} bytes '
                                    '(--max_request_bytes)')
        parts.append(part)
        if decompressor.eof:
            pending, decompressor = decompressor.unused_data, None
        else:
            pending = b''
    if decompressor is not None:
        raise RequestError(400, 'the gzip request body is truncated')
    return b''.join(parts)


def parse_json(raw_body):
    """Parse a request body as TF Serving does (RapidJSON with kParseNanAndInfFlag): standard JSON, plus the tokens
    NaN, Infinity and -Infinity. orjson parses the usual body and refuses those tokens; only then, and only if the
    body holds one, the json module (which accepts them) parses it again."""
    try:
        return orjson.loads(raw_body)
    except orjson.JSONDecodeError as error:
        if NON_FINITE_TOKEN.search(raw_body) is None:
            raise RequestError(400, f'JSON Parse error: {str(error)[:200]}') from None
        orjson_error = error
    try:
        return json.loads(raw_body)
    except (ValueError, RecursionError):
        raise RequestError(400, f'JSON Parse error: {str(orjson_error)[:200]}') from None


def decode_strings(value, depth):
    """Turn JSON strings and {"b64": ...} objects into bytes, keeping the nesting of lists, at most `depth` deep."""
    if isinstance(value, list):
        if depth <= 0:
            raise RequestError(400, 'string values are nested deeper than the input\'s shape allows')
        return [decode_strings(item, depth - 1) for item in value]
    if isinstance(value, dict):
        if set(value) != {'b64'} or not isinstance(value['b64'], str):
            raise RequestError(400, 'a string value given as an object must be {"b64": "<base64 string>"}')
        try:
            return base64.b64decode(value['b64'], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, 'invalid base64 data in a {"b64": ...} value') from None
    if isinstance(value, str):
        return value.encode('utf-8')
    raise RequestError(400, f'expected a string or {{"b64": ...}} value, got {json.dumps(value)[:40]}')


def to_array(name, value, info):
    """Convert one JSON input value to a numpy array matching the input's InputInfo, or raise RequestError(400)."""
    if info.is_string:
        strings = decode_strings(value, MAX_STRING_NESTING if info.shape is None else len(info.shape))
        try:
            array = np.array(strings, dtype=object)
        except ValueError:
            raise RequestError(400, f'input "{name}" is not a rectangular list of strings') from None
        if array.dtype != object or any(not isinstance(item, bytes) for item in array.ravel()):
            raise RequestError(400, f'input "{name}" is not a rectangular list of strings')
    else:
        try:
            array = np.asarray(value)
        except ValueError:
            raise RequestError(400, f'input "{name}" is not a rectangular list of numbers') from None
        # Only numbers are accepted: booleans, nulls and strings would be silently cast by numpy otherwise.
        if array.dtype.kind not in info.allowed_kinds:
            raise RequestError(400, f'input "{name}" must hold {info.dtype.name} values only')
        if array.dtype != info.numpy_dtype:
            try:
                converted = array.astype(info.numpy_dtype, casting='unsafe')
            except (TypeError, ValueError, OverflowError):
                raise RequestError(400, f'input "{name}" does not fit dtype {info.dtype.name}') from None
            if not fits(array, converted, info.numpy_dtype):
                raise RequestError(400, f'input "{name}" has values out of the range of {info.dtype.name}')
            array = converted
    shape = info.shape
    if shape is not None and (array.ndim != len(shape) or any(
            size is not None and size != actual for size, actual in zip(shape, array.shape))):
        raise RequestError(400, f'input "{name}" has shape {list(array.shape)}, the signature expects '
                                f'{info.shape_text}')
    return array


def fits(array, converted, dtype):
    """Whether numpy's cast kept every value in range: a finite number must not become infinite (1e308 in
    float32), and an integer input must lie within its type's bounds."""
    dtype = np.dtype(dtype)
    if dtype.kind == 'f':
        return array.dtype.kind != 'f' or bool(np.isfinite(converted).all()) or \
            not bool((np.isfinite(array) & ~np.isfinite(converted)).any())
    if dtype.kind in 'iu' and array.size:
        bounds = np.iinfo(dtype)
        return bool(array.min() >= bounds.min) and bool(array.max() <= bounds.max)
    return True


def read_instances(instances, input_names):
    """Turn the row format ("instances": one value or one object per row) into {input name: batch value}."""
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, '"instances" must be a non-empty list with one entry per example')
    if all(isinstance(row, dict) and not set(row) == {'b64'} for row in instances):
        columns = {name: [] for name in input_names}
        for row in instances:
            if set(row) != set(input_names):
                raise RequestError(400, f'each instance must have exactly the inputs {sorted(input_names)}, '
                                        f'got {sorted(row)}')
            for name in input_names:
                columns[name].append(row[name])
        return columns
    if len(input_names) != 1:
        raise RequestError(400, f'this signature has several inputs {sorted(input_names)}: '
                                'send one object per instance')
    return {input_names[0]: instances}


def read_inputs(inputs, input_names):
    """Turn the columnar format ("inputs": one value or {input name: value}) into {input name: value}."""
    if isinstance(inputs, dict) and set(inputs) != {'b64'}:
        if set(inputs) != set(input_names):
            raise RequestError(400, f'"inputs" must have exactly the inputs {sorted(input_names)}, '
                                    f'got {sorted(inputs)}')
        return inputs
    if len(input_names) != 1:
        raise RequestError(400, f'this signature has several inputs {sorted(input_names)}: '
                                'send "inputs" as an object keyed by input name')
    return {input_names[0]: inputs}


def read_predict_request(served, body):
    """Check a parsed :predict body against a ServedVersion's signatures and return a PredictRequest."""
    if not isinstance(body, dict):
        raise RequestError(400, 'the request body must be a JSON object')
    signature_name = body.get('signature_name', DEFAULT_SIGNATURE)
    if not isinstance(signature_name, str):
        raise RequestError(400, '"signature_name" must be a string')
    if signature_name == '':
        signature_name = DEFAULT_SIGNATURE
    if signature_name not in served.signatures:
        raise RequestError(400, f'Serving signature name: "{signature_name}" not found in signature def '
                                f'(available: {", ".join(sorted(served.signatures))})')
    if ('instances' in body) == ('inputs' in body):
        raise RequestError(400, 'the request must contain exactly one of "instances" (row format) '
                                'or "inputs" (columnar format)')
    inputs = served.inputs[signature_name]
    input_names = sorted(inputs)
    row_format = 'instances' in body
    if row_format:
        values = read_instances(body['instances'], input_names)
    else:
        values = read_inputs(body['inputs'], input_names)
    arrays = {name: to_array(name, values[name], inputs[name]) for name in input_names}
    return PredictRequest(signature_name, arrays, row_format)


def summarize_tf_error(error):
    """The one line of a TensorFlow error that says what was wrong, without graph node names and stack headers."""
    lines = [line.strip() for line in str(getattr(error, 'message', error)).splitlines()]
    noise = ('Graph execution error', 'Detected at node', '<stack traces', '[[', 'File "')
    useful = [line for line in lines if line and not line.startswith(noise)]
    return useful[-1][:300] if useful else type(error).__name__


def to_json_value(name, array):
    """Convert an output array to JSON values; string outputs named *_bytes go out as {"b64": ...} like TF Serving."""
    if array.dtype == object:
        if name.endswith('_bytes'):
            items = [{'b64': base64.b64encode(item).decode('ascii')} for item in array.ravel()]
        else:
            items = [item.decode('utf-8', errors='replace') for item in array.ravel()]
        return np.array(items, dtype=object).reshape(array.shape).tolist()
    if array.dtype == np.float32:
        # Print float32 values with the digits float32 holds, as TF Serving does.
        return array.astype(str).astype(np.float64).tolist()
    return array.tolist()


def encode_predict_reply(outputs, row_format):
    """The JSON reply body (bytes) for a signature's output arrays, in the request's format."""
    names = sorted(outputs)
    # orjson writes numeric arrays directly; strings, and NaN or infinity (which orjson would write as null and
    # TF Serving writes as NaN), take the general path through Python values.
    fast = all(array.dtype in FAST_DTYPES and array.ndim > 0 and
               (array.dtype.kind != 'f' or np.isfinite(array).all()) for array in outputs.values())
    if fast:
        values = {name: np.ascontiguousarray(outputs[name]) for name in names}
    else:
        values = {name: to_json_value(name, outputs[name]) for name in names}
    if not row_format:
        body = {'outputs': values[names[0]] if len(names) == 1 else values}
    elif len(names) == 1:
        body = {'predictions': values[names[0]]}
    else:
        batch_sizes = {outputs[name].shape[0] if outputs[name].ndim else None for name in names}
        if len(batch_sizes) != 1 or None in batch_sizes:
            raise RequestError(400, 'the outputs of this signature differ in their 0-th dimension: '
                                    'use the columnar format ("inputs")')
        body = {'predictions': [{name: values[name][row] for name in names} for row in range(batch_sizes.pop())]}
    if fast:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(body).encode('utf-8')
