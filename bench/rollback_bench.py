"""Measure how fast the local model server falls back to the previous version when the served one is retired.

Copies the newest version under --model_base_path twice into a temporary folder (as versions 1 and 2), starts
mnist_model/model_server.py on it with its default poll interval, and lets --clients threads send single-image
predicts on kept-alive connections. Each run then retires version 2 the way `mnist.py --retire 2` does (renames its
folder to a hidden `.retired-2-<time>` name) and measures the time until requests that name no version are answered
by version 1 (a probe asks GET /v1/models/mnist/metadata, which reports the answering version, every 10 ms), and
counts the clients' failed requests; then it renames the folder back and waits until version 2 serves again.
Prints the median switch time over --runs. Target on the 2-core reference machine: <= 2 s, 0 failed requests.

Example:
    python3 bench/rollback_bench.py --clients 8 --runs 3
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'mnist_model'))

import model_server  # noqa: E402 - found through the path set just above

DATA = os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')


class Clients:
    """Threads sending the same predict on kept-alive connections until stopped; counts answers and failures."""

    def __init__(self, port, clients, body):
        self.port, self.body = port, body
        self.answered, self.failed = [0], []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.send) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def send(self):
        connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
        while not self.stopping.is_set():
            try:
                connection.request('POST', '/v1/models/mnist:predict', body=self.body)
                reply = connection.getresponse()
                content = reply.read()
                if reply.status == 200:
                    self.answered[0] += 1
                else:
                    self.failed.append(f'HTTP {reply.status}: {content[:200]!r}')
            except (OSError, http.client.HTTPException) as error:
                self.failed.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
        connection.close()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)


def answering_version(connection):
    """The version that answers requests naming no version, from GET .../metadata."""
    connection.request('GET', '/v1/models/mnist/metadata')
    reply = connection.getresponse()
    content = reply.read()
    return json.loads(content)['model_spec']['version'] if reply.status == 200 else None


def wait_for_version(connection, version, timeout=60):
    """Seconds until `version` answers, probing every 10 ms; raises RuntimeError after timeout seconds."""
    started = time.perf_counter()
    while answering_version(connection) != version:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f'version {version} did not answer within {timeout} s')
        time.sleep(0.01)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description='Time the local model server\'s fall-back to the previous version.')
    parser.add_argument('--model_base_path', default=os.path.join(REPO, 'mnist_model'),
                        help='folder holding an exported version to copy (default: mnist_model/)')
    parser.add_argument('--clients', type=int, default=8, help='concurrent clients (default: 8)')
    parser.add_argument('--runs', type=int, default=3, help='retirements; the median is printed (default: 3)')
    parser.add_argument('--server_args', default='', help='extra flags for the server')
    args = parser.parse_args()
    if args.clients < 1 or args.runs < 1:
        parser.error('--clients and --runs must be >= 1')
    versions = model_server.list_versions(args.model_base_path)
    if not versions:
        print(f'error: no exported version under {args.model_base_path}; run `python3 mnist_model/mnist.py` first',
              file=sys.stderr)
        return 1
    with np.load(DATA, allow_pickle=False) as data:
        body = json.dumps({'instances': [data['x_test'][0].reshape(784).tolist()]}).encode()

    with tempfile.TemporaryDirectory() as base:
        for version in ('1', '2'):
            shutil.copytree(os.path.join(args.model_base_path, str(versions[-1])), os.path.join(base, version))
        port = model_server.free_port()
        process = model_server.launch(base, port, args.server_args.split())
        probe = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        switches, failures = [], []
        try:
            wait_for_version(probe, '2')
            time.sleep(3)  # Time for the standby to load (a server without one has nothing to wait for).
            for run in range(args.runs):
                clients = Clients(port, args.clients, body)
                time.sleep(1)
                retired = os.path.join(base, f'.retired-2-{int(time.time())}')
                os.rename(os.path.join(base, '2'), retired)
                switches.append(wait_for_version(probe, '1'))
                time.sleep(0.5)
                clients.stop()
                failures += clients.failed
                print(f'run {run + 1}: version 1 answered {switches[-1]:.2f} s after version 2 was retired; '
                      f'{clients.answered[0]} requests answered, {len(clients.failed)} failed')
                os.rename(retired, os.path.join(base, '2'))
                wait_for_version(probe, '2')
                time.sleep(3)
        finally:
            probe.close()
            process.terminate()
            process.wait(timeout=30)
    print(f'\n{args.clients} clients, median of {args.runs} retirements: version 1 answered '
          f'{statistics.median(switches):.2f} s after version 2 was retired (target <= 2 s); '
          f'{len(failures)} failed requests (target 0){": " + failures[0] if failures else ""}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
