"""The model server's log lines, and a stderr that can never block a request.

A server started with `subprocess.Popen(..., stderr=PIPE)` by a script that never reads the pipe would stop as soon
as the pipe's buffer (64 KiB on Linux) is full: every thread that writes a line waits for a reader that never comes.
`StderrPump` moves the process's file descriptor 2 onto a pipe of its own that a thread always empties into memory;
a second thread copies that to the real stderr and is the only one that can wait. Beyond MAX_PENDING_BYTES waiting
to be written, output is dropped and a line says how much. Everything written to descriptor 2 goes this way:
Python's lines, warnings and tracebacks, and TensorFlow's C++ log lines.

Example:
    pump = StderrPump()          # in the server's main(), before any thread starts
    log_line('Serving version 3 of model mnist')
    pump.close(timeout=2)        # at exit: write what is pending, give descriptor 2 back
"""

import collections
import os
import sys
import threading

MAX_PENDING_BYTES = 1 << 20


def log_line(message):
    """Write one line to stderr in a single call, so lines from concurrent threads never interleave."""
    sys.stderr.write(message + '\n')
    sys.stderr.flush()


class StderrPump:
    """Route file descriptor 2 through an always-drained pipe; see the module docstring."""

    def __init__(self):
        sys.stderr.flush()
        self.output_fd = os.dup(2)
        self.read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        # Chunks of output waiting to be written, and [count] markers where output was dropped.
        self.pending = collections.deque()
        self.pending_bytes = 0
        self.reading_done = False
        self.condition = threading.Condition()
        self.reader = threading.Thread(target=self.read_loop, name='stderr-reader', daemon=True)
        self.writer = threading.Thread(target=self.write_loop, name='stderr-writer', daemon=True)
        self.reader.start()
        self.writer.start()

    def read_loop(self):
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except OSError:
                data = b''
            with self.condition:
                if not data:
                    self.reading_done = True
                elif self.pending_bytes + len(data) <= MAX_PENDING_BYTES:
                    self.pending.append(data)
                    self.pending_bytes += len(data)
                elif self.pending and isinstance(self.pending[-1], list):
                    self.pending[-1][0] += len(data)
                else:
                    self.pending.append([len(data)])
                self.condition.notify_all()
            if not data:
                os.close(self.read_fd)
                return

    def write_loop(self):
        while True:
            with self.condition:
                while not self.pending and not self.reading_done:
                    self.condition.wait()
                if not self.pending:
                    return
                chunks = list(self.pending)
                self.pending.clear()
                self.pending_bytes = 0
            data = b''.join(chunk if isinstance(chunk, bytes) else
                            f'[{chunk[0]} bytes of log output dropped: stderr was not being read]\n'.encode()
                            for chunk in chunks)
            try:
                # This write is the only one that may wait for a reader of the real stderr.
                while data:
                    data = data[os.write(self.output_fd, data):]
            except OSError:  # The reader went away (EPIPE); keep draining so nothing else blocks.
                pass

    def close(self, timeout):
        """Give descriptor 2 back to the real stderr and wait up to timeout seconds for pending output."""
        sys.stderr.flush()
        # The pipe's only write end was descriptor 2: replacing it ends the reader once the pipe is empty.
        os.dup2(self.output_fd, 2)
        self.writer.join(timeout)
