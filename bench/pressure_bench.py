"""Put the local model server under pressure from many clients at once and measure what it costs and who waits.

Starts mnist_model/model_server.py (of --repo, so that an older checkout can be measured the same way) on a free
loopback port over --model_base_path, and runs the cases of issue 24, each against a fresh server:

  held      48 connections announce 16 MiB bodies and send all but the last byte: the server's RSS growth (peak),
            how many were refused at once (503) and how fast, and whether a one-row predict still gets 200 meanwhile
  trickle   a body sent one byte a second: the status and the seconds until the server answers (--body_deadline)
  unread    one connection pipelines 80 000 one-row predicts and never reads a reply (and six connections x 20 000):
            the server's RSS growth (peak), and its RSS after they closed
  fair      one client sends requests of the largest allowed image (a 4096x4096 PNG) back to back, while one-row
            predicts are offered at 100 a second, each timed from when it was due: their p50, p99 and max
  fds       the server started with `ulimit -n 256`, 400 idle connections: the status and seconds of a new request

Prints one line per case; the medians over --runs runs of its numbers. RSS is VmRSS from /proc, sampled every 20 ms.

Example:
    python3 bench/pressure_bench.py --model_base_path /tmp/models --cases held,unread,fair,fds,trickle --runs 3
    python3 bench/pressure_bench.py --repo /work/main --cases held          # the same case against another checkout
"""

import argparse
import base64
import importlib.util
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))

from image_bound_bench import png_of_zeros  # noqa: E402 - found through the path set just above
from serve_bench import rss_megabytes  # noqa: E402

PREDICT = '/v1/models/mnist:predict'
ONE_ROW = json.dumps({'instances': [[0] * 784]}).encode()


def request_bytes(body, path=PREDICT):
    return (f'POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
            f'Content-Length: {len(body)}\r\n\r\n').encode() + body


def read_status(sock, timeout):
    """The status code of the next reply on a socket (the rest of it is read too), or None on timeout or close."""
    sock.settimeout(timeout)
    data = b''
    try:
        while b'\r\n\r\n' not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b'\r\n\r\n')
        length = next((int(line.split(b':')[1]) for line in head.split(b'\r\n')
                       if line.lower().startswith(b'content-length:')), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(head.split()[1])
    except (socket.timeout, OSError):
        return None


def one_row_status(port, timeout=10):
    """(status or None, seconds) of one one-row predict on a new connection."""
    started = time.perf_counter()
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
            sock.sendall(request_bytes(ONE_ROW))
            return read_status(sock, timeout), time.perf_counter() - started
    except OSError:
        return None, time.perf_counter() - started


class RssSampler:
    """Samples a process's RSS every 20 ms in a thread; `peak` is the largest value seen (MB)."""

    def __init__(self, pid):
        self.pid, self.peak, self.running = pid, 0.0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss_megabytes(self.pid) or 0.0)
            time.sleep(0.02)

    def stop(self):
        self.running = False
        self.thread.join()
        return self.peak


def held_case(port, pid):
    """48 connections each holding a 16 MiB body open without its last byte."""
    size = 16 * 1024 * 1024
    payload = b'0' * (size - 1)
    before = rss_megabytes(pid)
    sampler = RssSampler(pid)
    sockets, refused, refusal_seconds = [], [0], []
    lock = threading.Lock()

    def hold():
        sock = socket.create_connection(('127.0.0.1', port), timeout=30)
        sockets.append(sock)
        started = time.perf_counter()
        sock.sendall(f'POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n'.encode())
        try:
            sock.sendall(payload)
        except OSError:
            pass  # refused: the server stopped reading
        status = read_status(sock, 0.5)
        if status == 503:
            with lock:
                refused[0] += 1
                refusal_seconds.append(time.perf_counter() - started)

    threads = [threading.Thread(target=hold) for _ in range(48)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(1)
    small_status, _ = one_row_status(port)
    # One more large body while the others are held: refused at once?
    with socket.create_connection(('127.0.0.1', port), timeout=30) as sock:
        started = time.perf_counter()
        sock.sendall(f'POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n'.encode())
        late_status = read_status(sock, 5)
        late_seconds = time.perf_counter() - started
    peak = sampler.stop()
    for sock in sockets:
        sock.close()
    time.sleep(3)
    return {'growth_mb': peak - before, 'refused': refused[0], 'one_row_status': small_status,
            'late_status': late_status, 'late_ms': late_seconds * 1000,
            'after_close_mb': rss_megabytes(pid) - before}


def trickle_case(port, pid, give_up_seconds=90):
    """A body of 10 000 bytes sent one byte a second, for at most give_up_seconds."""
    with socket.create_connection(('127.0.0.1', port), timeout=5) as sock:
        started = time.perf_counter()
        sock.sendall(f'POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n'.encode())
        sock.settimeout(1.0)
        status = None
        while time.perf_counter() - started < give_up_seconds:
            try:
                sock.sendall(b' ')
                data = sock.recv(65536)
                status = int(data.split()[1]) if data else None
                break
            except socket.timeout:
                continue
            except OSError:
                break
        return {'status': status, 'seconds': time.perf_counter() - started}


def unread_case(port, pid, connections=1, requests=80000, seconds=20):
    """`connections` connections each pipelining `requests` one-row predicts without reading any reply."""
    before = rss_megabytes(pid)
    sampler = RssSampler(pid)
    sent = [0] * connections
    sockets = [socket.create_connection(('127.0.0.1', port), timeout=seconds) for _ in range(connections)]
    # Requests are sent in blocks of 100, so the client never holds the whole stream (80 000 x 3 KB) in memory.
    block = request_bytes(ONE_ROW) * 100

    def pipeline(index):
        try:
            for _ in range(requests // 100):
                sockets[index].sendall(block)
                sent[index] += 100
        except OSError:
            pass  # the server stopped reading and the send timed out, or it closed the connection

    threads = [threading.Thread(target=pipeline, args=(index,), daemon=True) for index in range(connections)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    peak = sampler.stop()
    for sock in sockets:
        sock.close()
    time.sleep(3)
    status, _ = one_row_status(port)
    return {'growth_mb': peak - before, 'sent': sum(sent), 'after_close_mb': rss_megabytes(pid) - before,
            'one_row_status': status}


def fair_case(port, pid, seconds=20, rate=100):
    """Largest allowed image requests back to back from one client; one-row predicts paced to `rate`/s."""
    image = base64.b64encode(png_of_zeros(4096, 4096)).decode()
    image_body = json.dumps({'signature_name': 'predict_image', 'instances': [{'b64': image}]}).encode()
    stop = threading.Event()
    image_times, image_statuses = [], []

    def images():
        with socket.create_connection(('127.0.0.1', port), timeout=60) as sock:
            while not stop.is_set():
                started = time.perf_counter()
                sock.sendall(request_bytes(image_body))
                image_statuses.append(read_status(sock, 60))
                image_times.append(time.perf_counter() - started)

    thread = threading.Thread(target=images)
    thread.start()
    time.sleep(1)  # the first image request is under way
    latencies, errors = [], 0
    with socket.create_connection(('127.0.0.1', port), timeout=60) as sock:
        begin = time.perf_counter()
        for index in range(seconds * rate):
            if time.perf_counter() > begin + 2 * seconds:
                break  # a server that makes each predict wait for an image would take an image's time per predict
            due = begin + index / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            sock.sendall(request_bytes(ONE_ROW))
            errors += read_status(sock, 60) != 200
            latencies.append(time.perf_counter() - due)
    stop.set()
    thread.join()
    milliseconds = np.array(latencies) * 1000
    return {'p50_ms': float(np.percentile(milliseconds, 50)), 'p99_ms': float(np.percentile(milliseconds, 99)),
            'max_ms': float(milliseconds.max()), 'errors': errors, 'images': len(image_times),
            'image_s': statistics.median(image_times) if image_times else float('nan'),
            'image_status': sorted(set(image_statuses))}


def fds_case(port, pid, idle=400):
    """400 idle connections (the server was started with ulimit -n 256), then one new request."""
    sockets = []
    for _ in range(idle):
        try:
            sockets.append(socket.create_connection(('127.0.0.1', port), timeout=2))
        except OSError:
            break
    time.sleep(0.5)
    status, seconds = one_row_status(port, timeout=10)
    for sock in sockets:
        sock.close()
    return {'status': status, 'seconds': seconds, 'connected': len(sockets)}


CASES = {'held': held_case, 'trickle': trickle_case, 'unread': unread_case, 'fair': fair_case, 'fds': fds_case}


def start_server(model_server, base_path, case, server_args, log_path):
    """A server for one case (fds: under ulimit -n 256, through prlimit); returns (process, port)."""
    port = model_server.free_port()
    args = ['--file_system_poll_wait_seconds=0', *server_args]
    log_file = open(log_path, 'ab')
    if case != 'fds':
        return model_server.launch(base_path, port, args, log_file), port
    # launch() starts the script itself: lower this process's limit for the start, so that the server inherits it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        process = model_server.launch(base_path, port, args, log_file)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return process, port


def describe(case, results):
    def median(key):
        values = [result[key] for result in results if result[key] is not None]
        return statistics.median(values) if values else None

    if case == 'held':
        return (f'RSS growth {median("growth_mb"):.0f} MB (peak; target <= 320), {median("refused")} of 48 refused '
                f'with 503, one-row predict {[result["one_row_status"] for result in results]}, a 49th large body '
                f'{[result["late_status"] for result in results]} in {median("late_ms"):.0f} ms, '
                f'{median("after_close_mb"):+.0f} MB 3 s after closing')
    if case == 'trickle':
        return f'status {[result["status"] for result in results]} after {median("seconds"):.1f} s'
    if case == 'unread':
        return (f'RSS growth {median("growth_mb"):.0f} MB (peak; target <= 32), {median("sent"):.0f} requests sent, '
                f'{median("after_close_mb"):+.0f} MB 3 s after closing, then a one-row predict '
                f'{[result["one_row_status"] for result in results]}')
    if case == 'fair':
        return (f'one-row predicts at 100/s: p50 {median("p50_ms"):.1f} ms, p99 {median("p99_ms"):.1f} ms (target '
                f'<= 50), max {median("max_ms"):.0f} ms, errors {median("errors")}; {median("images")} image '
                f'requests of {median("image_s"):.2f} s, statuses {results[0]["image_status"]}')
    return (f'{median("connected")} idle connections, then a new request: '
            f'{[result["status"] for result in results]} in {median("seconds"):.2f} s (target 200 or 503 within 2 s)')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model_base_path', default=os.path.join(REPO, 'mnist_model'),
                        help='folder holding the exported version folders (default: mnist_model/)')
    parser.add_argument('--repo', default=REPO, help='checkout whose mnist_model/model_server.py runs (default: '
                                                     'this one)')
    parser.add_argument('--cases', default='held,trickle,unread,fair,fds',
                        help=f'comma-separated cases, of {",".join(CASES)} (default: all)')
    parser.add_argument('--runs', type=int, default=3, help='runs of each case; medians are printed (default: 3)')
    parser.add_argument('--body_deadline', type=float, default=60.0,
                        help='--body_deadline_seconds of the trickle case\'s server (default: 60, the server\'s '
                             'default)')
    parser.add_argument('--server_args', default='', help='extra flags for the server (default: none)')
    parser.add_argument('--six', action='store_true', help='unread: six connections x 20 000 instead of one x 80 000')
    args = parser.parse_args()
    cases = [case for case in args.cases.split(',') if case]
    unknown = [case for case in cases if case not in CASES]
    if unknown or args.runs < 1:
        parser.error(f'unknown cases {unknown}' if unknown else '--runs must be >= 1')
    # The server runs as a subprocess of its own file, so loading that file is all it takes to measure another
    # checkout (serve_bench, imported above, has imported this checkout's model_server already).
    spec = importlib.util.spec_from_file_location(
        'measured_model_server', os.path.join(os.path.abspath(args.repo), 'mnist_model', 'model_server.py'))
    model_server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_server)

    if not model_server.list_versions(args.model_base_path):
        print(f'error: no exported version under {args.model_base_path}; run `python3 mnist_model/mnist.py` first',
              file=sys.stderr)
        return 1
    log_path = os.path.join('/tmp', f'pressure-bench-{os.getpid()}.log')
    for case in cases:
        results = []
        server_args = args.server_args.split()
        if case == 'trickle' and args.repo == REPO:
            server_args.append(f'--body_deadline_seconds={args.body_deadline:g}')
        for _ in range(args.runs):
            process, port = start_server(model_server, args.model_base_path, case, server_args, log_path)
            try:
                one_row_status(port)  # warm up
                if case == 'unread' and args.six:
                    results.append(unread_case(port, process.pid, connections=6, requests=20000))
                else:
                    results.append(CASES[case](port, process.pid))
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        print(f'{case}: {describe(case, results)}', flush=True)
    with open(log_path, errors='replace') as log:
        notes = [line.strip() for line in log if 'lowered' in line or 'Gave' in line]
    print('server log lines:', *sorted(set(notes)) or ['(none about limits or memory)'], sep='\n  ')
    return 0


if __name__ == '__main__':
    sys.exit(main())
