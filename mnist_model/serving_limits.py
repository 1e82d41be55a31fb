"""Server-wide limits of the model server: the memory of request bodies, image work, descriptors, memory given back.

Per-request limits do not bound a server that many clients use at once. This module holds what bounds the whole:

- `BodyBudget`: the bytes of request bodies all connections may hold at a time (--max_body_memory_bytes). A body
  that would take more is refused (503) before it is read. Bodies of at most SMALL_BODY_BYTES (a one-row predict is
  3 KB) may use the whole budget; larger ones only what leaves --small_body_reserve_bytes free, so that clients
  holding large bodies open never starve one-row predicts. A body keeps its share until its request is answered,
  so the budget also bounds the bodies being decoded or waiting for the model.
- `image_pixels`: the pixels a PNG or JPEG decodes to, read from its header (PNG's IHDR, JPEG's frame header) the
  way the exported predict_image graph reads it, without decoding anything; `request_pixels` adds them up over a
  request's string inputs, for the per-request cap (--max_image_pixels_per_request).
- `connection_cap`: --max_connections, lowered to what the descriptor limit (RLIMIT_NOFILE, `ulimit -n`) allows
  after DESCRIPTOR_HEADROOM descriptors for the model's files, logs, pipes and lingering connections.
- `MemoryTrimmer`: gives memory freed after a burst back to the system (glibc's malloc_trim), once the server is
  idle.

Example:
    budget = BodyBudget(128 << 20, 16 << 20)
    if budget.resize(0, length):           # in the event loop
        ...                                # read the body; budget.resize(length, 0) once answered
    pixels = image_pixels(png_bytes)       # width * height from the header, or 0 for other bytes
"""

import ctypes
import ctypes.util
import os
import resource

# A body up to this size counts as small and may use the budget's reserved share (the server parses such bodies in
# its event loop, model_server.INLINE_BODY_BYTES).
SMALL_BODY_BYTES = 64 * 1024
# Descriptors kept free below the descriptor limit for everything but connections: the server holds 10 once
# started (stdio, the stderr pump's pipe, the listening socket, epoll, the event loop's socket pair), and a version
# being loaded opens its files. Connections, lingering ones included, count in --max_connections.
DESCRIPTOR_HEADROOM = 64
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# As the exported graph: a JPEG's frame header must come within this many segments.
MAX_JPEG_SEGMENTS = 1000
# The JPEG markers that start a frame header (SOF0-SOF15 but DHT, JPG and DAC).
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Trim only when the process grew by this much since the last trim, or request bodies of this many bytes were
# answered since (their memory is freed, but glibc keeps it): each trim walks the allocator's heaps.
TRIM_AFTER_BYTES = 16 * 1024 * 1024


class BodyBudget:
    """Bytes of request bodies held in the whole server; see the module docstring. Used from the event loop only."""

    def __init__(self, total_bytes, small_reserve_bytes):
        self.total_bytes = total_bytes
        self.large_limit = max(0, total_bytes - small_reserve_bytes)
        self.used = 0           # all bodies
        self.used_large = 0     # bodies over SMALL_BODY_BYTES

    def resize(self, old_size, new_size):
        """Change one body's share from old_size to new_size bytes (0: none); returns False, changing nothing, when
        the new size does not fit."""
        old_large = old_size if old_size > SMALL_BODY_BYTES else 0
        new_large = new_size if new_size > SMALL_BODY_BYTES else 0
        used = self.used - old_size + new_size
        used_large = self.used_large - old_large + new_large
        if new_size > old_size and (used > self.total_bytes or (new_large and used_large > self.large_limit)):
            return False
        self.used, self.used_large = used, used_large
        return True

    def refusal(self, size):
        """The message of a 503 for a body of `size` bytes (None: of unknown size) that does not fit."""
        size_text = 'a body' if size is None else f'a body of {size} bytes'
        return (f'the server holds {self.used} bytes of request bodies and cannot take {size_text} more (the limit '
                f'is {self.total_bytes} bytes, --max_body_memory_bytes, of which bodies over {SMALL_BODY_BYTES} '
                f'bytes may use {self.large_limit}): try again later')


def png_pixels(data):
    if len(data) < 24 or data[12:16] != b'IHDR':
        return 0
    return int.from_bytes(data[16:20], 'big') * int.from_bytes(data[20:24], 'big')


def jpeg_pixels(data):
    """Width x height from a JPEG's frame header, found by walking the segments before it as the exported graph
    does; 0 when there is none within MAX_JPEG_SEGMENTS segments (the graph refuses such an image)."""
    position = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        header = data[position:position + 9]
        if len(header) < 4 or header[0] != 0xFF:
            return 0
        marker = header[1]
        if marker in JPEG_FRAME_MARKERS:
            if len(header) < 9:
                return 0
            return int.from_bytes(header[5:7], 'big') * int.from_bytes(header[7:9], 'big')
        if marker in (0xD9, 0xDA):  # the end, or the scan, before any frame header
            return 0
        if marker == 0xFF:
            position += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
            position += 2
        else:
            position += 2 + int.from_bytes(header[2:4], 'big')
    return 0


def image_pixels(data):
    """The pixels a PNG or JPEG decodes to, from its header; 0 for other bytes (predict_image refuses them)."""
    if data[:8] == PNG_SIGNATURE:
        return png_pixels(data)
    if data[:3] == b'\xff\xd8\xff':
        return jpeg_pixels(data)
    return 0


def request_pixels(arrays):
    """The pixels of every PNG or JPEG among the string values of a request's input arrays."""
    total = 0
    for array in arrays.values():
        if array.dtype == object:
            for value in array.flat:
                total += image_pixels(value)
    return total


def connection_cap(requested):
    """(connections allowed, soft descriptor limit): `requested`, but at most the soft RLIMIT_NOFILE less
    DESCRIPTOR_HEADROOM (and at least 1)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested, soft
    return max(1, min(requested, soft - DESCRIPTOR_HEADROOM)), soft


def resident_bytes():
    """The process's resident memory in bytes (Linux /proc), or 0 where unknown."""
    try:
        with open('/proc/self/statm') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return 0


class MemoryTrimmer:
    """glibc's malloc_trim(0), which returns the free pages of every malloc heap to the system. Python and
    TensorFlow free the memory of a burst (bodies, parsed JSON, decoded images), but glibc keeps most of it mapped
    for later; measured in docs/serving.md. Elsewhere (musl, macOS) it does nothing."""

    def __init__(self):
        self.function = None
        name = ctypes.util.find_library('c')
        if name:
            try:
                self.function = ctypes.CDLL(name).malloc_trim
                self.function.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                self.function = None
        self.baseline = resident_bytes()

    def needed(self, body_bytes):
        """Whether a trim may give much back: `body_bytes` of request bodies were answered since the last trim, or
        the process grew by TRIM_AFTER_BYTES (cheap: one read of /proc)."""
        return self.function is not None and (body_bytes >= TRIM_AFTER_BYTES or
                                              resident_bytes() > self.baseline + TRIM_AFTER_BYTES)

    def trim(self):
        """Trim now (in a thread: it takes milliseconds on a large heap); returns the bytes given back."""
        before = resident_bytes()
        self.function(0)
        self.baseline = resident_bytes()
        return before - self.baseline


def describe_cap(requested, allowed, soft_limit):
    """The start-up line when the descriptor limit lowered --max_connections, else None."""
    if allowed >= requested:
        return None
    return (f'--max_connections {requested} lowered to {allowed}: the descriptor limit (ulimit -n) is {soft_limit}, '
            f'and {DESCRIPTOR_HEADROOM} descriptors are kept for model files and logs')

