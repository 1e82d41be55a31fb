"""Tests of demo_report.py on its own: a report rendered from a summary.json like run_demo.py's, from a hostile one
(markup in every text field, wrong types in every numeric field, sections of the wrong shape), and the layout of a
stage that did not run, read in headless Chromium.

    python3 -m pytest -q tests/test_demo_report.py
"""
import base64
import html.parser
import json
import math
import os

import pytest

import demo_report
import report_page
from conftest import REPO, browser_for

HOSTILE_TEXT = '<script>alert(1)</script>"><img src=x onerror=alert(2)>\' onmouseover=\'alert(3)'
# What a malformed numeric field holds: a text, null, NaN, a list, a boolean, an object.
WRONG_NUMBERS = ['high', None, math.nan, [0.9], True, {'value': 0.9}]
STAGE_NAMES = ['train', 'pipeline', 'tune', 'retrain', 'serve', 'notebook', 'stop']


def digit_png(digit):
    with open(os.path.join(REPO, 'mnist_model', 'test_data', f'{digit}.png'), 'rb') as picture:
        return base64.b64encode(picture.read()).decode('ascii')


def demo_summary():
    """A summary.json as run_demo.py writes it: the first four stages ran, the others did not."""
    stages = [{'name': name, 'title': name.capitalize(), 'status': 'not run', 'seconds': None, 'commands': [],
               'cluster_command': f'kubectl apply -f {name}.yaml', 'log': f'logs/{name}.log'} for name in STAGE_NAMES]
    for stage, seconds in zip(stages[:4], (9.5, 20.25, 40.0, 10.0)):
        stage.update(status='succeeded', seconds=seconds, commands=[f'python3 {stage["name"]}.py --flag=1'])
    hyperparameters = {'num_hidden_layer_1': 192, 'num_hidden_layer_2': 64, 'dropout': 0.5, 'learning_rate': 0.09,
                       'epoch': 2000}
    trials = [dict(hyperparameters, trial=f'trial-0{number}', status='succeeded', accuracy=accuracy, loss=0.1,
                   seconds=12.0) for number, accuracy in ((1, 0.9612), (2, 0.9731))]
    trials.append(dict(hyperparameters, trial='trial-03', status='failed', accuracy=None, loss=None, seconds=3.0))
    confusion = [[90 if row == column else 1 for column in range(10)] for row in range(10)]
    return {
        'started_at': '2026-12-07T12:00:00Z', 'mode': 'quick', 'report_dir': 'demo-report/x',
        'serving_dir': 'demo-report/x/serving', 'seconds': 97.3, 'stage_seconds': 79.75, 'trials': 3, 'parallel': 2,
        'stages': stages,
        'versions': [
            {'version': 1, 'accuracy': 0.9443, 'source': 'train', 'decision': 'promoted', 'message': 'Promoted: 1',
             'served_before': None, 'served_after': 1},
            {'version': None, 'accuracy': 0.9012, 'source': 'pipeline', 'decision': 'not promoted',
             'message': 'Not promoted: worse', 'served_before': 1, 'served_after': 1, 'baseline_accuracy': 0.9443,
             'baseline_version': 1, 'override': '--force_export'}],
        'tuning': {'trials': trials, 'best': 'trial-02', 'goal': 0.965, 'results': 'demo-report/x/tuning'},
        'served': {'url': 'http://127.0.0.1:8501/v1/models/mnist', 'pid': 123, 'version': 1, 'accuracy': 0.9443,
                   'recorded_accuracy': 0.9443, 'test_examples': 1000, 'confusion_matrix': confusion,
                   'hyperparameters': hyperparameters},
        'notebook': {'executed': 'demo-report/x/notebook/model_serve.ipynb', 'lines': ['sent [1, 3, 9] -> [1, 3, 9]'],
                     'figure_png': digit_png(0), 'table_markdown': '| digit | p |\n|---|---|\n| 1 | 0.99 |'},
        'predict_image': [{'sent': digit, 'digit': digit, 'confidence': 0.99, 'png': digit_png(digit)}
                          for digit in range(10)],
    }


def make_hostile(value, wrong_number):
    """The same structure with markup in every text and wrong_number in every number."""
    if isinstance(value, dict):
        return {key: make_hostile(item, wrong_number) for key, item in value.items()}
    if isinstance(value, list):
        return [make_hostile(item, wrong_number) for item in value]
    if isinstance(value, str):
        return HOSTILE_TEXT
    if isinstance(value, (int, float)):
        return wrong_number
    return value


class PageElements(html.parser.HTMLParser):
    """The tags and attributes of a page, as a browser's parser reads them."""

    def __init__(self, page):
        super().__init__()
        self.tags = []
        self.feed(page)

    def handle_starttag(self, tag, attributes):
        self.tags.append((tag, dict(attributes)))


def assert_no_markup_got_through(page):
    assert '<script' not in page.lower()
    for tag, attributes in PageElements(page).tags:
        assert tag not in ('script', 'iframe', 'object', 'embed'), tag
        assert not [name for name in attributes if name.startswith('on')], (tag, attributes)
        assert not (attributes.get('href') or '').strip().lower().startswith(('javascript:', 'http', '//')), attributes
        if tag == 'img':
            assert attributes['src'].startswith('data:image/png;base64,'), attributes
            base64.b64decode(attributes['src'].split(',', 1)[1], validate=True)


def write_summary(folder, summary):
    path = folder / 'summary.json'
    path.write_text(json.dumps(summary), encoding='utf-8')
    return path


def test_a_report_from_a_demo_summary(tmp_path):
    path = write_summary(tmp_path, demo_summary())
    assert demo_report.main([str(path)]) == 0
    page = (tmp_path / 'report.html').read_text(encoding='utf-8')
    assert_no_markup_got_through(page)
    assert 'invalid' not in page.replace('.invalid', '')
    assert 'served version 1<b>0.9443</b>' in page and '4 of 7 succeeded' in page
    assert page.count('src="data:image/png;base64,') == 2 + 10, 'chart, notebook figure and ten digits'
    assert '<a href="logs/train.log">logs/train.log</a>' in page
    # A stage that did not run: each label and the cluster's command on lines of their own.
    assert ('<div>by hand: -</div><div>on a Kubeflow cluster:</div><div class="command"><code class="words">'
            '<span class="word">kubectl</span>') in page
    assert page.count('<div>by hand:</div><div class="command">') == 4


@pytest.mark.parametrize('wrong_number', WRONG_NUMBERS, ids=repr)
def test_a_hostile_summary_renders_escaped_with_invalid_values(tmp_path, wrong_number):
    path = write_summary(tmp_path, make_hostile(demo_summary(), wrong_number))
    assert demo_report.main([str(path)]) == 0
    page = (tmp_path / 'report.html').read_text(encoding='utf-8')
    assert_no_markup_got_through(page)
    # The texts are shown, escaped; the numbers are shown as invalid, each where it belongs, not a whole section.
    assert page.count('&lt;script&gt;alert(1)&lt;/script&gt;') >= 20
    assert page.count(demo_report.INVALID) >= 40
    assert 'this part of summary.json is malformed' not in page
    assert '<table class="confusion">' not in page and 'the confusion matrix is not 10 rows of 10 counts' in page


def test_sections_of_the_wrong_shape_show_a_note_and_the_rest_of_the_page(tmp_path):
    summary = demo_summary()
    summary.update(stages=5, versions=['x'], tuning='oops', served=[1], notebook={'lines': 'x'}, predict_image=[None])
    path = write_summary(tmp_path, summary)
    assert demo_report.main([str(path)]) == 0
    page = (tmp_path / 'report.html').read_text(encoding='utf-8')
    assert_no_markup_got_through(page)
    # The headline, stages, versions, tuning, served and predict_image sections each say what is wrong.
    assert page.count('this part of summary.json is malformed') == 6
    assert 'Executed copy' in page and 'MNIST MLOps demo' in page


def test_a_summary_that_is_not_an_object_is_one_error_line(tmp_path, capsys):
    path = tmp_path / 'summary.json'
    path.write_text('[1, 2]', encoding='utf-8')
    assert demo_report.main([str(path)]) == 1
    error = capsys.readouterr().err
    assert error == f'demo_report.py: error: {path}: ValueError: not a JSON object\n'
    assert not (tmp_path / 'report.html').exists()


def test_a_stage_that_did_not_run_shows_its_commands_on_lines_of_their_own_in_a_browser(tmp_path):
    browser = browser_for('read the report')
    path = write_summary(tmp_path, demo_summary())
    assert demo_report.main([str(path)]) == 0
    try:
        report_page.open_report(browser, str(tmp_path / 'report.html'), 1280)
        layout = report_page.layout(browser)
        # The tops of the text of each label and of the command below them, for the last stage (not run).
        tops = browser.driver.execute_script('''
            const cell = document.querySelectorAll('table.stages tr:not(.stage) td[colspan]')[6];
            return Array.from(cell.children).map(child => [child.textContent.trim(),
                                                           Math.round(child.getBoundingClientRect().top)]);''')
    finally:
        browser.close()
    assert layout['problems'] == []
    assert [text for text, _ in tops] == ['by hand: -', 'on a Kubeflow cluster:', 'kubectl apply -f stop.yaml']
    assert tops[0][1] < tops[1][1] < tops[2][1], tops
