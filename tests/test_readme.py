"""README and docs/ stay true: every command they show names files that exist and flags the script accepts, run from
the repository's top folder; README's set-up commands are what CI runs; README stays short enough to read.

    python3 -m pytest -q tests/test_readme.py
"""
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

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
