"""Tests of the model server's HTTP layer (serving_http.py) and its answers to hostile input, through a real server.

One server subprocess for the module, on the small test model (conftest.py), with small limits so that each is
reached at once: 8 connections, 1 s for a request's head. Raw sockets send what HTTP clients would not: duplicate
Content-Length headers, bad request lines, control bytes, heads that never end. A second server, whose batches wait
1.5 s, shows the shutdown on SIGTERM with a request in flight. One test per class of issue 15.

Example:
    python3 -m pytest -q tests/test_model_server_http.py
"""

import base64
import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

import model_server
from conftest import read_replies, read_reply

MAX_CONNECTIONS = 8
METRICS_PATH = '/monitoring/prometheus/metrics'
PIXELS = [[0] * 784]


@pytest.fixture(scope='module')
def server(model_base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp('http')
    (folder / 'monitoring.config').write_text('prometheus_config { enable: true }\n')
    port = model_server.free_port()
    log_path = folder / 'server.log'
    with open(log_path, 'wb') as log_file:
        process = model_server.launch(model_base_dir, port, [
            f'--max_connections={MAX_CONNECTIONS}', '--header_timeout_seconds=1', '--body_timeout_seconds=1',
            '--access_log',
            '--file_system_poll_wait_seconds=0', f'--monitoring_config_file={folder / "monitoring.config"}'],
            log_file)
    try:
        yield {'port': port, 'url': f'http://127.0.0.1:{port}/v1/models/mnist', 'log': log_path, 'process': process,
               'metrics': f'http://127.0.0.1:{port}{METRICS_PATH}'}
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0 and 'Traceback' not in log_path.read_text()


def connect(port):
    return socket.create_connection(('127.0.0.1', port), timeout=10)


def closed_by_server(connection, timeout=10):
    """Whether the server closed the connection (orderly, not reset) within timeout seconds."""
    connection.settimeout(timeout)
    try:
        return connection.recv(65536) == b''
    except (socket.timeout, ConnectionResetError):
        return False


def test_listen_backlog_holds_a_thousand_clients_connecting_at_once(server):
    """ss shows a listening socket's backlog in its Send-Q column (http.server had 5)."""
    listing = subprocess.run(['ss', '-ltnH', f'sport = :{server["port"]}'], capture_output=True, text=True,
                             check=True).stdout.split()
    assert int(listing[2]) >= 1024, listing


def test_connections_over_the_limit_get_503_at_once_and_are_closed(server):
    """Runs right after the server started, so that no connection of another test is still open."""
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(connect(server['port']))
            held[-1].sendall(b'GET /v1/models/mnist HTTP/1.1\r\nHost: x\r\n\r\n')
            assert read_reply(held[-1])[0] == 'HTTP/1.1 200 OK'
        with connect(server['port']) as refused:
            # Answered at once, before it sent anything, then closed.
            status, headers, body = read_reply(refused)
            assert status == 'HTTP/1.1 503 Service Unavailable' and headers['connection'] == 'close'
            assert '--max_connections' in json.loads(body)['error']
            assert closed_by_server(refused)
        # The held connections are still served.
        held[0].sendall(b'GET /v1/models/mnist HTTP/1.1\r\nHost: x\r\n\r\n')
        assert read_reply(held[0])[0] == 'HTTP/1.1 200 OK'
    finally:
        for connection in held:
            connection.close()
    # Once they are closed, new connections are served again.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if requests.get(server['url'], timeout=10).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    assert requests.get(server['url'], timeout=10).status_code == 200


def test_a_head_sent_slowly_is_cut_off_after_the_header_timeout(server):
    """A client that sends a byte now and then never completes its head (slowloris): 408 after 1 s in total."""
    with connect(server['port']) as connection:
        started = time.monotonic()
        connection.sendall(b'GET /v1/models/mnist HTTP/1.1\r\n')
        reply = b''
        connection.settimeout(0.3)
        while time.monotonic() - started < 5 and not reply:
            try:
                connection.sendall(b'X')
                reply = connection.recv(65536)
            except socket.timeout:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
        seconds = time.monotonic() - started
    assert reply.startswith(b'HTTP/1.1 408 Request Timeout'), reply
    assert 0.9 < seconds < 4, seconds
    # A client that connects and sends nothing is closed as well, without a reply.
    with connect(server['port']) as idle:
        started = time.monotonic()
        assert closed_by_server(idle)
        assert time.monotonic() - started < 4


def test_a_body_that_stops_arriving_is_cut_off_after_the_body_timeout(server):
    """A client that sends its head and part of its body, then nothing: 408 once 1 s passed without any of it."""
    with connect(server['port']) as connection:
        connection.sendall(b'POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n')
        for _ in range(3):  # Body that keeps arriving, more often than the timeout, is not cut off.
            time.sleep(0.5)
            connection.sendall(b'{')
        started = time.monotonic()
        status, headers, body = read_reply(connection)
        seconds = time.monotonic() - started
    assert status.startswith('HTTP/1.1 408') and headers['connection'] == 'close', status
    assert 'no part of the request body arrived for 1 s' in json.loads(body)['error']
    assert 0.9 < seconds < 4, seconds


def test_a_body_sent_with_a_get_is_read_and_dropped_and_the_connection_stays_in_step(server):
    with connect(server['port']) as connection:
        connection.sendall(b'GET /v1/models/mnist HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n\r\n'
                           b'GET /smuggled HTTP/1.1\r\n\r\n'
                           b'GET /v1/models/mnist/versions/1/metadata HTTP/1.1\r\nHost: x\r\n\r\n')
        first, second = read_replies(connection, 2)
    assert first[0] == 'HTTP/1.1 200 OK' and 'model_version_status' in json.loads(first[2])
    assert second[0] == 'HTTP/1.1 200 OK' and json.loads(second[2])['model_spec']['version'] == '1'


SMUGGLING = [
    b'Content-Length: 2\r\nContent-Length: 2\r\n',
    b'Content-Length: 2\r\nContent-Length: 40\r\n',
    b'Content-Length: 2, 2\r\n',
    b'Content-Length: 2\r\nTransfer-Encoding: chunked\r\n',
]


@pytest.mark.parametrize('headers', SMUGGLING, ids=['duplicate', 'conflicting', 'list', 'with chunked'])
def test_duplicate_or_conflicting_lengths_get_400_and_the_connection_closes(server, headers):
    with connect(server['port']) as connection:
        connection.sendall(b'POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n' + headers + b'\r\n{}' +
                           b'GET /v1/models/mnist HTTP/1.1\r\nHost: x\r\n\r\n')
        status, reply_headers, body = read_reply(connection)
        assert status == 'HTTP/1.1 400 Bad Request' and reply_headers['connection'] == 'close'
        assert json.loads(body)['error'].startswith('Bad request: ')
        assert closed_by_server(connection)


BAD_HTTP = [
    (b'NONSENSE\r\n\r\n', 400),
    (b'GET /v1/models/mnist HTTP/1.1 extra\r\n\r\n', 400),
    (b'GET /v1/models/mnist HTTP/1.1\r\nno colon here\r\n\r\n', 400),
    (b'GET /v1/models/mnist HTTP/1.1\r\nHost : x\r\n\r\n', 400),
    (b'GET /v1/models/mnist?\x1b[2J HTTP/1.1\r\n\r\n', 400),
    (b'GET /v1/models/mnist HTTP/1.1\r\nX: ' + b'a' * 70_000 + b'\r\n\r\n', 431),
    (b'GET /v1/models/mnist HTTP/1.1\r\n' + b'X: a\r\n' * 101 + b'\r\n', 431),
    (b'POST /v1/models/mnist:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{}', 400),
    (b'GET /v1/models/mnist HTTP/1.1\r\nHost: x', 400),
]


@pytest.mark.parametrize('payload, status', BAD_HTTP, ids=['not http', 'extra word', 'no colon', 'space before colon',
                                                           'control byte', 'header too long', 'too many headers',
                                                           'chunked body cut', 'head cut'])
def test_every_bad_request_gets_a_4xx_with_a_status_line_and_a_json_error(server, payload, status):
    with connect(server['port']) as connection:
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)  # the client ends its side: the server must still answer
        status_line, headers, body = read_reply(connection)
    assert status_line.startswith(f'HTTP/1.1 {status} ') and headers['connection'] == 'close'
    assert set(json.loads(body)) == {'error'}


def test_no_control_bytes_reach_the_log(server):
    hostile = [b'GET /v1/models/mnist?\x1b]0;owned\x07 HTTP/1.1\r\n\r\n', b'\x1b[31mGET / HTTP/1.1\r\n\r\n',
               b'GET /v1/models/mnist?probe=%1b%07 HTTP/1.1\r\nHost: x\r\n\r\n']
    for payload in hostile:
        with connect(server['port']) as connection:
            connection.sendall(payload)
            read_reply(connection)
    time.sleep(0.3)
    log = server['log'].read_bytes()
    assert b'"GET /v1/models/mnist?probe=%1b%07 HTTP/1.1" 200' in log
    assert b'"-" 400' in log  # the refused ones are logged without what they sent
    assert not re.search(rb'[\x00-\x09\x0b-\x1f\x7f]', log)


def predict_status(server, body, headers=None):
    reply = requests.post(server['url'] + ':predict', data=body, headers=headers, timeout=30)
    return reply.status_code, reply.json()


def test_bad_input_gets_400_never_500(server):
    port = server['port']
    # A version segment of non-ASCII digits, raw or percent-encoded ("²" passes str.isdigit(), not int()).
    with connect(port) as connection:
        connection.sendall('GET /v1/models/mnist/versions/\u00b2 HTTP/1.1\r\n\r\n'.encode('utf-8'))
        assert read_reply(connection)[0].startswith('HTTP/1.1 400')
    # Bytes that are not ASCII in the query, and an Upgrade header (h2c), are no reason for an error.
    with connect(port) as connection:
        connection.sendall(b'GET /v1/models/mnist?name=\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n')
        assert read_reply(connection)[0].split()[1] in ('200', '400')
    reply = requests.get(server['url'], headers={'Connection': 'Upgrade, HTTP2-Settings', 'Upgrade': 'h2c',
                                                 'HTTP2-Settings': 'AAMAAABkAARAAAAAAAIAAAAA'}, timeout=10)
    assert reply.status_code == 200
    reply = requests.get(server['url'] + '/versions/%C2%B2', timeout=10)
    assert reply.status_code == 400 and 'integer' in reply.json()['error']
    # A Content-Length that is not a number, also when the client waits for 100 Continue.
    for expect in (b'', b'Expect: 100-continue\r\n'):
        with connect(port) as connection:
            connection.sendall(b'POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n' + expect +
                               b'Content-Length: abc\r\n\r\n')
            status, _, body = read_reply(connection)
            assert status.startswith('HTTP/1.1 400') and 'Content-Length' in json.loads(body)['error']
    # Strings nested 990 deep for predict_image (the Python recursion limit is 1000).
    nested = json.dumps(base64.b64encode(b'x').decode())
    for _ in range(990):
        nested = f'[{nested}]'
    code, reply = predict_status(server, f'{{"signature_name": "predict_image", "instances": {nested}}}')
    assert code == 400 and 'nested deeper' in reply['error']
    numbers = '[' * 990 + '0' + ']' * 990
    assert predict_status(server, f'{{"instances": {numbers}}}')[0] == 400
    # Pixel values beyond float32 would become infinity and NaN probabilities.
    code, reply = predict_status(server, json.dumps({'instances': [[1e308] + [0] * 783]}))
    assert code == 400 and 'out of the range of float32' in reply['error']
    assert predict_status(server, '{"instances": [[1e999' + ', 0' * 783 + ']]}')[0] == 400
    assert requests.get(server['url'], timeout=10).status_code == 200


def test_nan_and_infinity_tokens_are_accepted_as_tf_serving_does(server):
    for token in ('NaN', 'Infinity', '-Infinity'):
        body = '{"instances": [[' + token + ', 0' * 783 + ']]}'
        reply = requests.post(server['url'] + ':predict', data=body, timeout=30)
        assert reply.status_code == 200, (token, reply.text)
        assert len(reply.json()['predictions'][0]['probabilities']) == 10
    # The tokens in a body that is malformed anyway keep the parse error; "NaN" in a string is no token.
    assert predict_status(server, '{"instances": [[NaN, ]]}')[0] == 400
    code, reply = predict_status(server, json.dumps({'instances': PIXELS, 'signature_name': 'NaN'}))
    assert code == 400 and 'NaN' in reply['error']


def test_gzip_bodies_of_many_members(server):
    gzip_header = {'Content-Encoding': 'gzip'}
    plain = json.dumps({'instances': PIXELS}).encode()
    expected = requests.post(server['url'] + ':predict', data=plain, timeout=30).json()
    # Many small members decode like one (the body split into 500 members).
    step = -(-len(plain) // 500)
    members = b''.join(gzip.compress(plain[start:start + step]) for start in range(0, len(plain), step))
    reply = requests.post(server['url'] + ':predict', data=members, headers=gzip_header, timeout=30)
    assert reply.status_code == 200 and reply.json() == expected
    # 1 MB of empty members (quadratic before: 0.8 s) is refused by its member count, at once.
    empty_members = gzip.compress(b'') * (1_000_000 // len(gzip.compress(b'')))
    started = time.monotonic()
    code, reply = predict_status(server, empty_members, gzip_header)
    assert code == 400 and 'members' in reply['error'] and time.monotonic() - started < 5


def test_gunzip_reads_every_member_and_keeps_its_limits():
    from serving_json import RequestError

    data = os.urandom(50_000)
    members = b''.join(gzip.compress(data[start:start + 1000]) for start in range(0, len(data), 1000))
    assert model_server.gunzip(members, 10 ** 6) == data
    assert model_server.gunzip(b'', 10) == b''
    for body, status in ((members, 413), (members[:-3], 400), (members + b'\0', 400)):
        with pytest.raises(RequestError) as error:
            model_server.gunzip(body, 10_000 if status == 413 else 10 ** 6)
        assert error.value.status == status


def test_metrics_labels_come_only_from_the_served_model(server):
    session = requests.Session()
    for index in range(200):
        assert session.get(f'http://127.0.0.1:{server["port"]}/v1/models/invented-{index}',
                           timeout=10).status_code == 404
    text = session.get(server['metrics'], timeout=10).text
    assert 'invented' not in text
    count = re.search(r'^:tensorflow:serving:request_count\{model_name="<unknown>",status="NOT_FOUND"\} (\S+)$',
                      text, re.M)
    assert count and float(count[1]) >= 200
    session.close()


BATCHING = '''
max_batch_size { value: 4 }
batch_timeout_micros { value: 1500000 }
'''


def test_sigterm_stops_accepting_finishes_requests_in_flight_and_exits_0(model_base_dir, tmp_path):
    """A predict waits 1.5 s for its batch to fill; SIGTERM arrives meanwhile. The predict is answered, new
    connections are refused, a client stuck in the middle of its body does not hold the exit past the grace."""
    (tmp_path / 'batching.config').write_text(BATCHING)
    port = model_server.free_port()
    with open(tmp_path / 'server.log', 'wb') as log_file:
        process = model_server.launch(model_base_dir, port, [
            f'--batching_parameters_file={tmp_path / "batching.config"}', '--file_system_poll_wait_seconds=0',
            '--shutdown_grace_seconds=3'], log_file)
    answers = []

    def send_predict():
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        connection.request('POST', '/v1/models/mnist:predict', body=json.dumps({'instances': PIXELS}))
        reply = connection.getresponse()
        answers.append((reply.status, json.loads(reply.read())))

    try:
        stuck = connect(port)
        stuck.sendall(b'POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"in')
        client = threading.Thread(target=send_predict)
        client.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(('127.0.0.1', port), timeout=5)
        client.join(timeout=30)
        code = process.wait(timeout=30)
        seconds = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stuck.close()
    assert answers and answers[0][0] == 200 and len(answers[0][1]['predictions']) == 1
    assert code == 0 and seconds < 3 + 3, seconds
    log = (tmp_path / 'server.log').read_text()
    assert 'Shutting down' in log and log.rstrip().endswith('Server stopped') and 'Traceback' not in log
