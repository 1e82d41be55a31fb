"""Load-test the local model server: single-image predicts from concurrent keep-alive clients, then 100-image batches.

Starts mnist_model/model_server.py on a free loopback port over --model_base_path (default: the mnist_model/ folder,
which must hold an exported version: run `python3 mnist_model/mnist.py` first), sends --requests predicts of one MNIST
test image each from --clients threads (one kept-alive connection each), twice per run: as fast as the clients can
(the throughput), and paced to --rate requests/s in total (the latency at that load; when every client is always
waiting, p50 is just clients / throughput; --rate 0 skips these runs). Prints the medians over --runs of p50/p99
latency, requests per second and errors, the server's CPU time per request (which other load on the machine changes
far less than the throughput), the served predictions' accuracy, the server's RSS before and after, and the latency of
one --batch-image request. --server_args passes flags to the server, e.g. "--enable_batching=false".
The clients run in this process, on the same cores as the server. Targets on the 2-core reference machine:
>= 2000 requests/s and p99 <= 20 ms with 8 clients, p50 <= 1 ms with 1 client, p50 <= 5 ms at 300 requests/s,
0 errors, RSS growth < 50 MB.

Example:
    python3 bench/serve_bench.py --requests 10000 --clients 8 --runs 3
    python3 bench/serve_bench.py --requests 5000 --clients 1 --runs 3 --rate 0
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'mnist_model'))

import model_server  # noqa: E402 - found through the path set just above

DATA = os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')
PREDICT_PATH = '/v1/models/mnist:predict'


def rss_megabytes(pid):
    """Resident memory of a process in MB, from /proc (Linux); None elsewhere."""
    try:
        with open(f'/proc/{pid}/status') as status:
            for line in status:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    """User and system CPU seconds a process has used, from /proc (Linux); None elsewhere. Unlike requests/s, the
    CPU a request costs the server changes little when other programs load the machine."""
    try:
        with open(f'/proc/{pid}/stat') as stat:
            fields = stat.read().rsplit(')', 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def encode_requests(images):
    """One JSON body per image, made before timing so the clients measure the server, not json.dumps."""
    return [json.dumps({'instances': [image.reshape(784).tolist()]}).encode() for image in images]


def send_all(port, bodies, labels, clients, rate=None):
    """Send every body once from `clients` threads, as fast as they can or paced to `rate` requests/s in total;
    return (latencies in s, errors, correct answers, seconds).

    When paced, request i is due at start + i / rate and its latency counts from then, so a server that falls
    behind shows it in the latency instead of quietly receiving fewer requests."""
    latencies, errors, correct = [], [0], [0]
    lock = threading.Lock()
    begin = time.perf_counter() + 0.05

    def client(indices):
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        own_latencies, own_errors, own_correct = [], 0, 0
        for index in indices:
            if rate:
                started = begin + index / rate
                time.sleep(max(0.0, started - time.perf_counter()))
            else:
                started = time.perf_counter()
            try:
                connection.request('POST', PREDICT_PATH, body=bodies[index],
                                   headers={'Content-Type': 'application/json'})
                reply = connection.getresponse()
                content = reply.read()
                own_latencies.append(time.perf_counter() - started)
                if reply.status != 200:
                    own_errors += 1
                    continue
                own_correct += json.loads(content)['predictions'][0]['digit'] == labels[index]
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                own_errors += 1
                connection.close()
                connection = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        connection.close()
        with lock:
            latencies.extend(own_latencies)
            errors[0] += own_errors
            correct[0] += own_correct

    threads = [threading.Thread(target=client, args=(range(start, len(bodies), clients),)) for start in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0], correct[0], time.perf_counter() - begin


def time_batch(port, images, repeats=5):
    """Median seconds of one request carrying all `images`; raises RuntimeError if the reply is wrong."""
    body = json.dumps({'instances': images.reshape(len(images), 784).tolist()}).encode()
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        connection.request('POST', PREDICT_PATH, body=body, headers={'Content-Type': 'application/json'})
        reply = connection.getresponse()
        content = reply.read()
        durations.append(time.perf_counter() - started)
        if reply.status != 200 or len(json.loads(content)['predictions']) != len(images):
            raise RuntimeError(f'batched request failed: HTTP {reply.status} {content[:200]!r}')
    connection.close()
    return statistics.median(durations)


def summarize(latencies, errors, correct, seconds):
    latencies_ms = np.array(latencies) * 1000
    return {'p50': float(np.percentile(latencies_ms, 50)), 'p99': float(np.percentile(latencies_ms, 99)),
            'rps': (len(latencies) + errors) / seconds, 'errors': errors,
            'accuracy': correct / max(1, len(latencies) + errors)}


def describe(result):
    cpu = f', server CPU {result["cpu_ms"]:.3f} ms/request' if result.get('cpu_ms') is not None else ''
    return (f'p50 {result["p50"]:.2f} ms, p99 {result["p99"]:.2f} ms, {result["rps"]:.0f} requests/s, '
            f'{result["errors"]} errors, accuracy {result["accuracy"]:.4f}{cpu}')


def main():
    parser = argparse.ArgumentParser(description='Load-test mnist_model/model_server.py on a free loopback port.')
    parser.add_argument('--model_base_path', default=os.path.join(REPO, 'mnist_model'),
                        help='folder holding the exported version folders (default: mnist_model/)')
    parser.add_argument('--requests', type=int, default=10000, help='single-image requests per run (default: 10000)')
    parser.add_argument('--clients', type=int, default=8, help='concurrent clients (default: 8)')
    parser.add_argument('--rate', type=int, default=300,
                        help='requests/s the clients offer together in the paced runs; 0 skips them (default: 300)')
    parser.add_argument('--runs', type=int, default=3, help='runs of each kind; medians are printed (default: 3)')
    parser.add_argument('--batch', type=int, default=100, help='images in the batched request (default: 100)')
    parser.add_argument('--server_args', default='',
                        help='extra flags for the server, e.g. "--enable_batching=false" (default: none)')
    args = parser.parse_args()
    for name in ('requests', 'clients', 'runs', 'batch'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1')
    if args.rate < 0:
        parser.error('--rate must be >= 0')
    if not model_server.list_versions(args.model_base_path):
        print(f'error: no exported version under {args.model_base_path}; run `python3 mnist_model/mnist.py` first',
              file=sys.stderr)
        return 1

    with np.load(DATA, allow_pickle=False) as data:
        images, labels = data['x_test'], data['y_test']
    picks = np.arange(args.requests) % len(images)
    bodies = encode_requests(images[picks])
    expected = labels[picks].tolist()

    port = model_server.free_port()
    process = model_server.launch(args.model_base_path, port,
                                  ['--file_system_poll_wait_seconds=0', *args.server_args.split()])
    try:
        # Warm up the connection handling and the model before measuring memory and time.
        send_all(port, bodies[:100], expected[:100], args.clients)
        rss_before = rss_megabytes(process.pid)
        saturated, paced = [], []
        for run in range(args.runs):
            cpu_before = cpu_seconds(process.pid)
            saturated.append(summarize(*send_all(port, bodies, expected, args.clients)))
            cpu_after = cpu_seconds(process.pid)
            saturated[-1]['cpu_ms'] = None if cpu_before is None else (cpu_after - cpu_before) * 1000 / len(bodies)
            print(f'run {run + 1}, as fast as possible: {describe(saturated[-1])}')
            if args.rate:
                paced.append(summarize(*send_all(port, bodies, expected, args.clients, rate=args.rate)))
                print(f'run {run + 1}, {args.rate} requests/s offered: {describe(paced[-1])}')
        rss_after = rss_megabytes(process.pid)
        batch_seconds = time_batch(port, images[:args.batch])
    finally:
        process.terminate()
        process.wait(timeout=30)

    def median(results, key):
        return statistics.median(result[key] for result in results)

    print(f'\n{args.requests} single-image predicts per run from {args.clients} keep-alive clients, '
          f'median of {args.runs} runs:')
    targets = '(targets with 1 client: p50 <= 1 ms)' if args.clients == 1 else \
        '(targets with 8 clients: >= 2000 requests/s, p99 <= 20 ms)'
    print(f'  as fast as possible: {median(saturated, "rps"):.0f} requests/s, p50 {median(saturated, "p50"):.2f} ms, '
          f'p99 {median(saturated, "p99"):.2f} ms {targets} (every client always waiting, so p50 is about '
          f'{args.clients} / throughput)')
    if saturated[0].get('cpu_ms') is not None:
        print(f'  server CPU {median(saturated, "cpu_ms"):.3f} ms per request (user + system, all its threads)')
    if paced:
        print(f'  at {args.rate} requests/s offered: p50 {median(paced, "p50"):.2f} ms (target <= 5), '
              f'p99 {median(paced, "p99"):.2f} ms')
    print(f'  errors {sum(result["errors"] for result in saturated + paced)} (target 0), '
          f'served accuracy {median(saturated, "accuracy"):.4f}')
    if rss_before is not None and rss_after is not None:
        print(f'  server RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after '
              f'(growth {rss_after - rss_before:+.1f} MB, target < 50)')
    print(f'{args.batch}-image batched request: {batch_seconds * 1000:.1f} ms (median of 5)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
