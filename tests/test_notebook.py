"""Run model_serve.ipynb headless (nbclient) against a local model server, and with the server down.

Example:
    python3 -m pytest -q tests/test_notebook.py
"""

import json
import os
import re
import shutil
import signal

import nbformat
import pytest
from nbclient import NotebookClient

import model_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'model_serve.ipynb')


def run_notebook(monkeypatch, predict_url, mnist_nums=None):
    """Execute the notebook from the repository folder with MNIST_PREDICT_URL set; return (notebook, all text)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if mnist_nums is not None:
        settings = notebook.cells[1]
        assert 'mnist_nums = [1, 3, 9]' in settings.source
        settings.source = settings.source.replace('mnist_nums = [1, 3, 9]', f'mnist_nums = {mnist_nums}')
    # The kernel inherits this environment: the URL under test, and none of the ingress settings of the caller.
    monkeypatch.setenv('MNIST_PREDICT_URL', predict_url)
    for name in ('MNIST_HOST_HEADER', 'MNIST_AUTH_COOKIE', 'MNIST_TOKEN'):
        monkeypatch.delenv(name, raising=False)
    # Any cell raising an exception fails the run: the notebook must explain problems, not show tracebacks.
    NotebookClient(notebook, timeout=120, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
    texts = []
    for cell in notebook.cells:
        for output in cell.get('outputs', []):
            texts.append(output.get('text', ''))
            texts.append(output.get('data', {}).get('text/markdown', ''))
    return notebook, '\n'.join(texts)


@pytest.fixture(scope='module')
def server_url(tmp_path_factory, model_base_dir):
    base = tmp_path_factory.mktemp('notebook') / 'mnist_model'
    shutil.copytree(model_base_dir, base)
    port = model_server.free_port()
    process = model_server.launch(str(base), port, ['--file_system_poll_wait_seconds=0'])
    try:
        yield f'http://127.0.0.1:{port}/v1/models/mnist'
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == 'code':
            assert cell.outputs == [] and cell.execution_count is None
    assert "os.environ.get('MNIST_PREDICT_URL', 'http://127.0.0.1:8501/v1/models/mnist:predict')" \
        in notebook.cells[1].source


def test_notebook_shows_the_right_digits(server_url, monkeypatch):
    digits = list(range(10))
    notebook, text = run_notebook(monkeypatch, server_url + ':predict', digits)
    assert f'sent {digits} -> predicted {digits}' in text
    assert f'predict_image: sent {digits} -> predicted {digits}; the same answers as the pixel request.' in text
    table_rows = re.findall(r'^\| (\d) \| (\d) \| ([\d.]+)% \|', text, flags=re.MULTILINE)
    assert [(int(sent), int(predicted)) for sent, predicted, _ in table_rows] == [(d, d) for d in digits]
    figures = [output for cell in notebook.cells for output in cell.get('outputs', [])
               if 'image/png' in output.get('data', {})]
    assert len(figures) == 1


def test_notebook_explains_a_down_server_in_one_sentence(monkeypatch):
    url = f'http://127.0.0.1:{model_server.free_port()}/v1/models/mnist:predict'
    notebook, text = run_notebook(monkeypatch, url)
    assert text.count(f'Could not reach the model server at {url} (ConnectionError)') == 2
    assert 'Traceback' not in text and 'sent [1, 3, 9]' not in text
    outputs = [output for cell in notebook.cells for output in cell.get('outputs', [])]
    assert not any(output.get('output_type') == 'error' for output in outputs)


def test_notebook_shows_the_servers_error_body(server_url, monkeypatch):
    _, text = run_notebook(monkeypatch, server_url.replace('/mnist', '/no-such-model') + ':predict')
    error = json.dumps({'error': 'Servable not found for request: Latest(no-such-model)'})
    assert text.count(f'The model server answered HTTP 404: {error}') == 2
    assert 'Traceback' not in text
