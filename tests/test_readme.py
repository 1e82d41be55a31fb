"""README and docs/ stay true: every command they show names files that exist and flags the script accepts, run from
the repository's top folder; README's set-up commands are what CI runs; README stays short enough to read.

    python3 -m pytest -q tests/test_readme.py
"""
import functools
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import REPO

def free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


DOCUMENTS = ['README.md'] + sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, 'docs', '*.md')))


def command_lines(text):
    """The shell lines of a Markdown text's code blocks (fenced, or indented by four spaces), with continuation
    lines joined."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if line.strip().startswith('```'):
            in_fence = not in_fence
            continue
        if in_fence or line.startswith('    '):
            lines.append(line.strip())
    joined = '\n'.join(lines).replace('\\\n', ' ')
    return [line for line in joined.splitlines() if line and not line.startswith(('#', '{', '"', '|'))]


def python_commands(document):
    """(script, flags) of every `python3 <script>.py ...` command in a document's code blocks."""
    with open(os.path.join(REPO, document), encoding='utf-8') as file:
        text = file.read()
    commands = []
    for line in command_lines(text):
        for part in re.split(r'\s*(?:&&|\|\||\||;|\$\()\s*', line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            if len(words) >= 2 and words[0] == 'python3' and words[1].endswith('.py'):
                flags = [word.split('=', 1)[0] for word in words[2:] if word.startswith('--')]
                commands.append((words[1], flags))
    return commands


@functools.lru_cache(maxsize=None)
def help_text(script):
    python = sys.executable
    if os.path.basename(script) == 'mnist_pipeline_v2.py':
        # The KFP v2 pipeline runs in the second environment (requirements-kfp2.txt).
        from pipeline_cli import find_kfp2_python
        python = find_kfp2_python()
        if python is None:
            (pytest.fail if os.environ.get('CI') == 'true' else pytest.skip)(
                'the kfp 2 environment is missing: set MNIST_KFP2_PYTHON to its python')
    process = subprocess.run([python, script, '--help'], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 0, f'{script} --help: {process.stderr}'
    return process.stdout


@pytest.mark.parametrize('document', DOCUMENTS)
def test_commands_name_scripts_and_flags_that_exist(document):
    commands = python_commands(document)
    if document == 'README.md':
        assert len(commands) >= 10
    for script, flags in commands:
        assert os.path.isfile(os.path.join(REPO, script)), f'{document}: {script} does not exist (from the top folder)'
        accepted = set(re.findall(r'--[A-Za-z][\w-]*', help_text(script)))
        unknown = [flag for flag in flags if flag not in accepted]
        assert not unknown, f'{document}: {script} has no flag {unknown[0]}'


@pytest.mark.parametrize('document', DOCUMENTS)
def test_files_named_in_commands_exist(document):
    with open(os.path.join(REPO, document), encoding='utf-8') as file:
        text = file.read()
    for line in command_lines(text):
        for path in re.findall(r'(?<![\w/.<-])((?:mnist_model|kubeflow|bench|docs|tests)/[\w./-]+\.(?:py|yaml|png|config|'
                               r'ipynb|npz|md))', line):
            assert os.path.exists(os.path.join(REPO, path)), f'{document}: {path} does not exist'


def test_readme_setup_commands_are_what_ci_runs():
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as file:
        readme = file.read()
    with open(os.path.join(REPO, '.ci', 'run'), encoding='utf-8') as file:
        ci = file.read()
    assert 'pip install -r requirements.txt && python3 mnist_model/mnist.py' in readme
    assert 'pip install -r requirements-dev.txt && python3 -m pytest -q' in readme
    assert 'build_venv "$venv" requirements-dev.txt ' in ci and "# README's test command:\npython3 -m pytest -q\n" in ci
    # The second environment, for the KFP v2 pipeline, is built from the file README's step 3 installs.
    assert 'build_venv "$venv_kfp2" requirements-kfp2.txt ' in ci
    assert 'pip install -r requirements-kfp2.txt' in readme
    # The first command installs what opening the notebook needs.
    with open(os.path.join(REPO, 'requirements-base.txt'), encoding='utf-8') as file:
        requirements = file.read()
    assert re.search(r'^jupyterlab==[\d.]+$', requirements, re.MULTILINE)
    assert re.search(r'^ipykernel==[\d.]+$', requirements, re.MULTILINE)
    assert 'jupyter lab model_serve.ipynb' in readme


def test_readme_is_short_and_links_what_exists():
    size = os.path.getsize(os.path.join(REPO, 'README.md'))
    assert size <= 20 * 1024, f'README.md is {size} bytes'
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as file:
        readme = file.read()
    for target in re.findall(r'\]\(((?!https?:|#)[^)#]+)', readme):
        assert os.path.exists(os.path.join(REPO, target)), f'README links {target}, which does not exist'
    # Every command runs from the top folder: no `cd` into a subfolder first.
    assert not re.search(r'^\s*cd mnist_model\b', readme, re.MULTILINE)


def readme_section(heading):
    """The text of README's section that starts with the heading, up to the next heading of its level or above."""
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as file:
        text = file.read()
    start = text.index(f'\n{heading}\n')
    following = re.search(r'^#{1,3} ', text[start + len(heading) + 2:], re.MULTILINE)
    return text[start:start + len(heading) + 2 + following.start()] if following else text[start:]


def test_step_7_runs_top_to_bottom_from_the_top_folder(tmp_path, model_base_dir):
    """README step 7's commands, run in sequence by one shell as a reader pastes them, from a copy of the top folder
    whose mnist_model/ holds one small version; then the `kill %1` the text gives to stop the server."""
    section = readme_section('### 7. Serve the model')
    blocks = re.findall(r'^```bash\n(.*?)^```', section, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, 'step 7 is one block of commands'
    assert '`kill %1` stops it' in section
    top = tmp_path / 'top'
    shutil.copytree(os.path.join(REPO, 'mnist_model'), top / 'mnist_model', ignore=lambda folder, names: [
        name for name in names if name.isdigit() or name.startswith('.') or name in ('data', '__pycache__')])
    shutil.copytree(os.path.join(model_base_dir, '1'), top / 'mnist_model' / '1')
    # Another port than README's 8501, which something else on the machine may hold; the commands are otherwise
    # exactly README's.
    port = str(free_port())
    script = blocks[0].replace('8501', port) + 'kill %1\nwait\n'
    process = subprocess.Popen(['bash', '-e', '-c', script], cwd=top, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode in (0, 143), stderr  # `wait` returns the server's status after SIGTERM, or 0.
    # The replies follow one another as curl prints them, with no newline between them: status JSON, predict JSON,
    # then the metrics lines.
    decoder = json.JSONDecoder()
    status, end = decoder.raw_decode(stdout, stdout.index('{"model_version_status"'))
    assert [(item['version'], item['state']) for item in status['model_version_status']] == [('1', 'AVAILABLE')]
    reply, end = decoder.raw_decode(stdout, stdout.index('{"predictions"', end))
    (answer,) = reply['predictions']
    assert 0 <= answer['digit'] <= 9 and len(answer['probabilities']) == 10
    # The metrics of the same server count the requests above.
    assert re.search(r'^:tensorflow:serving:request_count\{.*\} [1-9]', stdout[end:].lstrip(), re.MULTILINE), stdout
    # Step 10's look at the drift monitor: its window, and the served version it watches.
    drift, end = decoder.raw_decode(stdout, re.search(r'\{\s*"model_name"', stdout[end:]).start() + end)
    assert drift['window'] == 200 and drift['model_name'] == 'mnist'
    assert 'Traceback' not in stderr
