"""Measure the drift monitor of the local model server: false alerts on clean traffic, how soon each shift is alerted,
and that KServe's logger path (drift_monitor.py fed CloudEvents) reports the same scores.

Starts mnist_model/model_server.py on --model_base_path (a version exported with its profile: `python3
mnist_model/mnist.py`) and sends single-image predicts from one client, through serving_default (784 raw pixels) and
predict_image (PNG), as a user of either would:
  1. clean: --clean_windows windows of MNIST test digits in random order through each signature; every alert that
     starts is a false alert (target: at most 1 in 20 windows);
  2. for each shift of mnist_model/drift_shifts.py and each signature: clean digits until the version is calm, then
     shifted digits until the alert starts (the detection delay, in requests; target <= 500), then clean ones until
     it ends. Also the served accuracy on the shifted digits, which says whether an alert was deserved.
With --kserve_check, every request and reply of the first run is also posted to a drift_monitor.py process as KServe's
payload logger posts them, and the two monitors' final states are compared. Medians over --runs (seeds 0, 1, ...).
The monitor's cost on throughput is measured by bench/serve_bench.py with and without --drift_window=0.

Example:
    python3 bench/drift_bench.py --runs 3 --kserve_check
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import numpy as np
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'mnist_model'))

import drift  # noqa: E402 - found through the path set just above
import drift_shifts  # noqa: E402
import model_server  # noqa: E402

DATA = os.path.join(REPO, 'mnist_model', 'data', 'mnist.npz')
SIGNATURES = ('serving_default', 'predict_image')
MAX_SHIFTED = 500
# The JSON state is read every this many requests while a shift is sent: the delay is known to within it.
LOOK_EVERY = 10


def request_body(signature, digit):
    if signature == 'serving_default':
        return {'instances': [digit.reshape(784).tolist()]}
    return {'signature_name': 'predict_image',
            'instances': [{'b64': base64.b64encode(drift_shifts.png_bytes(digit)).decode('ascii')}]}


class Client:
    """One keep-alive client of the server; optionally every exchange is also posted to a drift_monitor as KServe's
    payload logger would post it."""

    def __init__(self, server_url, monitor_url=None):
        self.session = requests.Session()
        self.server_url = server_url
        self.monitor_url = monitor_url
        self.sent = 0

    def predict(self, signature, digit):
        body = json.dumps(request_body(signature, digit)).encode('utf-8')
        reply = self.session.post(self.server_url + '/v1/models/mnist:predict', data=body, timeout=60)
        reply.raise_for_status()
        self.sent += 1
        if self.monitor_url:
            event_id = str(uuid.uuid4())
            for kind, data in (('request', body), ('response', reply.content)):
                self.session.post(self.monitor_url + '/', data=data, timeout=60, headers={
                    'Ce-Specversion': '1.0', 'Ce-Id': event_id, 'Ce-Source': 'http://localhost:9081/',
                    'Ce-Type': f'org.kubeflow.serving.inference.{kind}', 'Ce-Inferenceservicename': 'mnist',
                    'Ce-Namespace': 'bench', 'Ce-Component': 'predictor', 'Ce-Endpoint': 'default',
                    'Content-Type': 'application/json'}).raise_for_status()
        return reply.json()['predictions'][0]['digit']

    def state(self, url=None):
        """The server's (or monitor's) /monitoring/drift once it has processed everything sent."""
        while True:
            state = self.session.get((url or self.server_url) + '/monitoring/drift', timeout=30).json()
            if state['queued_inputs'] == 0 and sum(state['inputs_seen'].values()) >= self.sent:
                return state
            time.sleep(0.02)


def alert_of(state):
    return bool(state['versions']) and state['versions'][0]['alert']


def highest_score(state, signature):
    signals = state['versions'][0]['signatures'][signature]['signals'].values()
    return max((signal['score'] for signal in signals if signal['score'] is not None), default=0.0)


def run_clean(client, signature, digits, window, windows):
    """Send windows x window clean digits; return the alerts that started and the highest score of the signature's
    signals once its window held only these digits (the margin the thresholds leave)."""
    alerts, highest, alerting = 0, 0.0, alert_of(client.state())
    for index in range(window * windows):
        client.predict(signature, digits[index % len(digits)])
        if (index + 1) % drift.DEFAULT_STEP == 0:
            state = client.state()
            now = alert_of(state)
            alerts += now and not alerting
            alerting = now
            if index + 1 >= window:
                highest = max(highest, highest_score(state, signature))
    return alerts, highest


def calm_down(client, signature, digits, window):
    """Send clean digits until the version's alert has ended (at most 3 windows); return False if it did not."""
    for index in range(3 * window):
        if index % drift.DEFAULT_STEP == 0 and not alert_of(client.state()):
            return True
        client.predict(signature, digits[index % len(digits)])
    return not alert_of(client.state())


def run_shift(client, signature, shifted, labels):
    """Send shifted digits until the alert starts; return (requests until then or None, accuracy)."""
    correct = 0
    for index, digit in enumerate(shifted[:MAX_SHIFTED]):
        correct += client.predict(signature, digit) == labels[index]
        if (index + 1) % LOOK_EVERY == 0 and alert_of(client.state()):
            return index + 1, correct / (index + 1)
    return None, correct / min(MAX_SHIFTED, len(shifted))


def run_once(client, seed, window, clean_windows, shifts):
    with np.load(DATA, allow_pickle=False) as data:
        x_test, y_test = data['x_test'], data['y_test']
    order = np.random.default_rng(seed).permutation(len(x_test))
    clean, pool = x_test[order[:5000]], order[5000:]
    result = {'false_alerts': {}, 'highest_clean_score': {}, 'delay': {}, 'accuracy': {}}
    for signature in SIGNATURES:
        alerts, highest = run_clean(client, signature, clean, window, clean_windows)
        result['false_alerts'][signature], result['highest_clean_score'][signature] = alerts, highest
        print(f'  seed {seed}: clean {signature}: {alerts} alerts in {clean_windows} windows of {window}; highest '
              f'score {highest:.2f}', flush=True)
    for shift in shifts:
        chosen = pool[np.random.default_rng(seed + 100).permutation(len(pool))[:MAX_SHIFTED]]
        shifted = drift_shifts.apply_shift(shift, x_test[chosen], seed=seed)
        for signature in SIGNATURES:
            if alert_of(client.state()):
                print(f'  seed {seed}: {shift} {signature}: the alert before it did not end; skipped')
                continue
            delay, accuracy = run_shift(client, signature, shifted, y_test[chosen])
            # Clean digits through the same signature flush its window, so that the version's alert ends.
            calm_down(client, signature, clean, window)
            result['delay'][shift, signature] = delay
            result['accuracy'][shift, signature] = accuracy
            print(f'  seed {seed}: {shift:10s} {signature:15s} alert after '
                  f'{delay if delay is not None else "none in " + str(MAX_SHIFTED)} requests; served accuracy '
                  f'{accuracy:.3f}', flush=True)
    return result


def compare_with_monitor(client, monitor_url):
    """Whether the KServe-path monitor reports exactly the server's versions, scores and alerts."""
    served = client.state()
    logged = client.state(monitor_url)
    return served['versions'] == logged['versions'], served, logged


def start_monitor(base_path, window):
    port = model_server.free_port()
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'mnist_model', 'drift_monitor.py'),
                                f'--port={port}', f'--model_base_path={base_path}', f'--drift_window={window}'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}'
    for _ in range(600):
        try:
            requests.get(url + '/healthz', timeout=1)
            return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError('drift_monitor.py did not start')


def summarize(results, shifts, clean_windows):
    print(f'\nfalse alerts on clean traffic ({clean_windows} windows per signature per run; target <= 1):')
    for signature in SIGNATURES:
        print(f'  {signature}: {[result["false_alerts"][signature] for result in results]} per run; highest score '
              f'{max(result["highest_clean_score"][signature] for result in results):.2f} (thresholds '
              f'{min(drift.THRESHOLDS.values()):g}+)')
    print(f'detection delay in requests (median over runs; target <= {MAX_SHIFTED}) and served accuracy:')
    for shift in shifts:
        cells = []
        for signature in SIGNATURES:
            # A trial skipped because the alert before it had not ended has no entry.
            delays = [result['delay'][shift, signature] for result in results if (shift, signature) in result['delay']]
            if not delays:
                cells.append(f'{signature} skipped')
                continue
            found = [delay for delay in delays if delay is not None]
            accuracy = statistics.median(result['accuracy'][shift, signature] for result in results
                                         if (shift, signature) in result['accuracy'])
            delay = f'{statistics.median(found):.0f}' if len(found) == len(delays) else \
                f'missed in {len(delays) - len(found)} of {len(delays)}'
            cells.append(f'{signature} {delay} (accuracy {accuracy:.3f})')
        print(f'  {shift:10s} ' + '; '.join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model_base_path', default=os.path.join(REPO, 'mnist_model'),
                        help='serving folder with a version exported with its profile (default: mnist_model/)')
    parser.add_argument('--runs', type=int, default=3, help='runs, with seeds 0, 1, ... (default: 3)')
    parser.add_argument('--clean_windows', type=int, default=20,
                        help='clean windows per signature per run (default: 20)')
    parser.add_argument('--shifts', default=','.join(drift_shifts.SHIFTS),
                        help=f'comma-separated shifts (default: {",".join(drift_shifts.SHIFTS)})')
    parser.add_argument('--kserve_check', action='store_true',
                        help='also post the first run\'s traffic to drift_monitor.py as KServe\'s logger would, and '
                             'compare the states')
    args = parser.parse_args()
    shifts = [shift for shift in args.shifts.split(',') if shift]
    unknown = [shift for shift in shifts if shift not in drift_shifts.SHIFTS]
    if unknown or args.runs < 1 or args.clean_windows < 0:
        parser.error(f'unknown shifts {unknown}' if unknown else '--runs must be >= 1 and --clean_windows >= 0')
    window = drift.DEFAULT_WINDOW
    results = []
    for run in range(args.runs):
        # A server per run, so that every run starts from empty windows.
        port = model_server.free_port()
        server = model_server.launch(args.model_base_path, port, [f'--drift_window={window}'])
        monitor = None
        try:
            monitor_url = None
            if args.kserve_check and run == 0:
                monitor, monitor_url = start_monitor(args.model_base_path, window)
            client = Client(f'http://127.0.0.1:{port}', monitor_url)
            started = time.perf_counter()
            results.append(run_once(client, run, window, args.clean_windows, shifts))
            print(f'  run {run + 1}: {client.sent} requests in {time.perf_counter() - started:.0f} s', flush=True)
            if monitor_url:
                same, served, logged = compare_with_monitor(client, monitor_url)
                print(f'KServe logger path: {"the same" if same else "DIFFERENT"} versions, scores and alerts as '
                      f'the server after {client.sent} predicts')
                if not same:
                    print(json.dumps({'server': served['versions'], 'monitor': logged['versions']})[:4000])
        finally:
            for process in (server, monitor):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=30)
    summarize(results, shifts, args.clean_windows)
    print(f'load average now: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    main()
