"""The metric channel of a tuning trial: the one whole-line pattern its metrics are read with, and the guard that keeps
every other line the trial writes from matching it.

Katib's StdOut metrics collector runs the trial as `sh -c '<command> 1>file 2>&1'`, splits that file at '\n' and
applies each pattern of the Experiment's metricsCollectorSpec.source.filter.metricsFormat to every line with Go's
FindAllStringSubmatch (group 1 the name, group 2 the value). mnist_hyper_tuning.py's local tuner reads a trial's log
the same way. A pattern anchored at both ends matches only a line that is nothing but a metric, such as
`accuracy=0.981200`; the guard then makes sure that the trial's own two metric lines are the only such lines, whatever
paths or records the trial mentions on the way: everything else it writes, from Python or from native code, on
stdout or stderr, goes to stderr, and a line there that the pattern would read is prefixed with MASK.

Example:
    pattern = re.compile(metric_line_format(('accuracy', 'loss')))
    with other_output_masked(pattern):
        train_and_print_progress()            # stdout and stderr reach stderr, masked line by line
    print('accuracy=0.981200\\nloss=0.063400')  # the only lines the pattern reads
"""
import contextlib
import io
import os
import re
import sys
import threading

# What a masked line starts with: no metric line starts so, so the anchored pattern never reads the line.
MASK = '(not a metric) '
# A line this long without a newline is written out (masked) rather than held: no metric line is this long.
LONGEST_HELD_LINE = 1 << 20


def metric_line_format(names):
    """The anchored pattern of a metric line as Go's regexp and Python's re both read it: a name, '=', a fixed-point
    number, and nothing else on the line. [0-9] rather than \\d, which in Python also matches other scripts' digits."""
    return '^(' + '|'.join(re.escape(name) for name in names) + r')=([0-9]+\.[0-9]+)$'


def read_metrics(text, pattern, names):
    """Every value the pattern reads in a trial's output, as Katib's collector does (lines split at '\\n' only):
    {name: [values in the order written]}."""
    found = {name: [] for name in names}
    for line in text.split('\n'):
        for match in pattern.finditer(line):
            if match.group(1) in found:
                found[match.group(1)].append(float(match.group(2)))
    return found


def single_line(text):
    """Text the trial echoes (a path, an error message) with its line breaks escaped, so that it stays one line."""
    return str(text).replace('\\', '\\\\').replace('\r', '\\r').replace('\n', '\\n')


def mask_line(line, pattern):
    """The line as written, or prefixed with MASK if the metric pattern would read it (str or bytes alike)."""
    if isinstance(line, bytes):
        return MASK.encode() + line if pattern.search(line.decode('utf-8', errors='replace')) else line
    return MASK + line if pattern.search(line) else line


class MaskingWriter(io.TextIOBase):
    """A text stream that passes whole lines on to `target`, each through mask_line. It stays usable after finish():
    a logging handler created inside the guard may keep writing to it."""

    def __init__(self, target, pattern):
        super().__init__()
        self.target, self.pattern, self.pending = target, pattern, ''

    def writable(self):
        return True

    # Libraries look at a stream's encoding and file descriptor: the target's (writes to it pass native_output_masked).
    @property
    def encoding(self):
        return getattr(self.target, 'encoding', 'utf-8')

    def fileno(self):
        return self.target.fileno()

    def write(self, text):
        self.pending += text
        *lines, self.pending = self.pending.split('\n')
        for line in lines:
            self.target.write(mask_line(line, self.pattern) + '\n')
        if len(self.pending) > LONGEST_HELD_LINE:
            self.target.write(MASK + self.pending)
            self.pending = ''
        return len(text)

    def flush(self):
        self.target.flush()

    def finish(self):
        """Ends a last unfinished line (masked), so that nothing written later can complete it into a metric line."""
        if self.pending:
            self.target.write(mask_line(self.pending, self.pattern) + '\n')
            self.pending = ''
        self.target.flush()


def copy_masked(read_end, write_end, pattern):
    """Copies bytes from one file descriptor to another until end of file, line by line through mask_line."""
    pending = b''
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b'\n')
        out = b''.join(mask_line(line, pattern) + b'\n' for line in lines)
        if len(pending) > LONGEST_HELD_LINE:
            out, pending = out + MASK.encode() + pending, b''
        write_all(write_end, out)
    if pending:
        write_all(write_end, mask_line(pending, pattern) + b'\n')


def write_all(descriptor, data):
    while data:
        data = data[os.write(descriptor, data):]


@contextlib.contextmanager
def native_output_masked(pattern):
    """File descriptors 1 and 2 (what native code such as TensorFlow's C++ logging writes to) lead into a pipe whose
    lines reach the real stderr through mask_line; restored on exit."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    saved_stdout, saved_stderr = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    copier = threading.Thread(target=copy_masked, args=(read_end, saved_stderr, pattern), daemon=True)
    copier.start()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        # Python's own streams may hold text written to fd 1 or 2 inside: it must go through the pipe, masked.
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        os.dup2(saved_stdout, 1)
        os.dup2(saved_stderr, 2)
        os.close(saved_stdout)
        # The copier sees end of file once fds 1 and 2 no longer lead into the pipe.
        copier.join(timeout=30)
        os.close(saved_stderr)
        os.close(read_end)


@contextlib.contextmanager
def other_output_masked(pattern):
    """Inside, everything the process writes goes to stderr, masked by mask_line: sys.stdout and sys.stderr through a
    MaskingWriter (what print() and Python's warnings write), fds 1 and 2 through native_output_masked."""
    writer = MaskingWriter(sys.stderr, pattern)
    with native_output_masked(pattern):
        try:
            with contextlib.redirect_stdout(writer), contextlib.redirect_stderr(writer):
                yield
        finally:
            writer.finish()
