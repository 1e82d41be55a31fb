"""Tests of run_demo.py: the whole demo at tiny size (--quick), as a presenter runs it, and stopping it with Ctrl-C.

    python3 -m pytest -q tests/test_run_demo.py
"""
import html
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import demo_report
import report_page
from conftest import REPO, browser_for

RUN_DEMO = os.path.join(REPO, 'run_demo.py')
STAGES = ['train', 'pipeline', 'tune', 'retrain', 'serve', 'notebook', 'drift', 'stop']


def start_demo(*args, environment=None):
    return subprocess.Popen([sys.executable, RUN_DEMO, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, env={**os.environ, **(environment or {})})


def page_text(page):
    """The text a reader sees on an HTML page, without its tags."""
    return html.unescape(re.sub(r'<[^>]+>', '', page))


def processes_mentioning(text):
    """The command lines of running processes that mention text (e.g. a report folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as cmdline:
                command = cmdline.read().replace(b'\0', b' ').decode(errors='replace')
        except OSError:
            continue
        if text in command and int(pid) != os.getpid():
            found.append(command)
    return found


@pytest.fixture(scope='module')
def quick_demo(tmp_path_factory):
    """One `run_demo.py --quick` with the time of every line it printed, and a temporary folder of its own."""
    report_dir = str(tmp_path_factory.mktemp('demo') / 'report')
    temporary = str(tmp_path_factory.mktemp('tmp'))
    process = start_demo('--quick', '--output', report_dir, environment={'TMPDIR': temporary})
    lines, started = [], time.monotonic()
    for line in process.stdout:
        lines.append((time.monotonic() - started, line.rstrip('\n')))
    code = process.wait(timeout=600)
    with open(os.path.join(report_dir, 'summary.json'), encoding='utf-8') as summary_file:
        summary = json.load(summary_file)
    with open(os.path.join(report_dir, 'report.html'), encoding='utf-8') as report_file:
        page = report_file.read()
    return {'code': code, 'lines': lines, 'text': '\n'.join(line for _, line in lines), 'dir': report_dir,
            'summary': summary, 'page': page, 'temporary': temporary}


def test_every_stage_succeeds_and_prints_its_start_and_end(quick_demo):
    assert quick_demo['code'] == 0, quick_demo['text'][-3000:]
    stages = quick_demo['summary']['stages']
    assert [stage['name'] for stage in stages] == STAGES
    assert [stage['status'] for stage in stages] == ['succeeded'] * len(STAGES)
    text = quick_demo['text']
    for stage in stages:
        assert re.search(rf'^\[{stage["name"]}\] {re.escape(stage["title"])} \.\.\.$', text, re.MULTILINE)
        assert re.search(rf'^\[{stage["name"]}\] done in \d+\.\d s of wall time$', text, re.MULTILINE)
        assert os.path.getsize(os.path.join(quick_demo['dir'], stage['log'])) > 0
    # The stages' own progress shows: training steps and trials.
    assert re.search(r'^  \[train\] step +100/100 ', text, re.MULTILINE)
    assert re.search(r'^  \[tune\] \[2/2\] trial-0\d accuracy 0\.\d{4}', text, re.MULTILINE)
    assert text.splitlines()[-1].startswith('Demo finished in ')
    assert os.path.join(quick_demo['dir'], 'report.html') in text.splitlines()[-1]
    # Nothing on screen stops mid-sentence (a line ending in a colon goes on in the next line of its stage) or is a
    # tool's own chatter.
    lines = text.splitlines()
    for line, following in zip(lines, lines[1:] + ['']):
        assert not line.endswith(':') or following.startswith(line[:line.index(']') + 2]), line
        assert '[NbConvertApp]' not in line


def test_console_and_report_give_the_same_wall_time(quick_demo):
    summary, page = quick_demo['summary'], quick_demo['page']
    seconds = summary['seconds']
    assert quick_demo['text'].splitlines()[-1].startswith(f'Demo finished in {seconds:.1f} s of wall time. ')
    assert f'it took {seconds} s of wall time from start to end' in page
    stage_sum = round(sum(stage['seconds'] for stage in summary['stages']), 1)
    assert summary['stage_seconds'] == stage_sum and f'add up to {stage_sum} s' in page
    # The tuning runs beside the pipeline and the server starts beside the retraining: the other stages, one after
    # another, fit in the run's time.
    one_after_another = sum(stage['seconds'] for stage in summary['stages'] if stage['name'] not in ('tune', 'serve'))
    assert one_after_another <= seconds <= stage_sum + 10
    # The last line came out at the wall time it names (the test's clock started a moment earlier).
    assert quick_demo['lines'][-1][0] == pytest.approx(seconds, abs=5)


def test_it_is_never_silent_for_long(quick_demo):
    times = [0.0] + [seconds for seconds, _ in quick_demo['lines']]
    longest = max(later - earlier for earlier, later in zip(times, times[1:]))
    assert longest <= 13.0, f'{longest:.1f} s without a line'


def test_the_served_version_is_the_one_the_promotion_rule_picked(quick_demo):
    summary = quick_demo['summary']
    serving_dir = os.path.join(REPO, summary['serving_dir'])
    names = os.listdir(serving_dir)
    assert not [name for name in names if name.startswith('.tmp-')]
    versions = sorted(int(name) for name in names if name.isdigit())
    assert summary['served']['version'] == versions[-1]
    promoted = [entry for entry in summary['versions'] if entry['decision'] == 'promoted']
    assert [entry['version'] for entry in promoted] == versions
    # Each version was promoted over the one served before it; declined candidates were worse than the one served.
    best_so_far = 0.0
    for entry in summary['versions']:
        with_record = entry['version'] is not None
        if with_record:
            with open(os.path.join(serving_dir, str(entry['version']), 'assets.extra', 'run.json')) as record_file:
                record = json.load(record_file)
            assert record['accuracy'] == entry['accuracy'] >= best_so_far
            assert record['promotion']['decision'] == 'promoted'
            best_so_far = entry['accuracy']
        else:
            assert entry['decision'] == 'not promoted' and entry['accuracy'] < best_so_far
    assert [entry['source'] for entry in summary['versions']] == ['train', 'pipeline', 'retrain']
    # The server's answers on the test set score what the served version's record says.
    served = summary['served']
    assert served['accuracy'] == pytest.approx(served['recorded_accuracy'], abs=0.002)
    assert sum(map(sum, served['confusion_matrix'])) == served['test_examples'] == 1000


def test_the_short_budget_pipeline_run_is_declined_and_the_served_version_stays(quick_demo):
    summary, text, page = quick_demo['summary'], quick_demo['text'], quick_demo['page']
    declined = [entry for entry in summary['versions'] if entry['decision'] == 'not promoted']
    assert [entry['source'] for entry in declined] == ['pipeline']
    (entry,) = declined
    assert entry['version'] is None and entry['override'] == '--force_export'
    assert entry['baseline_version'] == entry['served_before'] == entry['served_after'] == 1
    assert entry['accuracy'] < entry['baseline_accuracy'] == summary['versions'][0]['accuracy']
    assert '--epoch=25' in summary['stages'][1]['commands'][0]
    accuracy, baseline = f'{entry["accuracy"]:.4f}', f'{entry["baseline_accuracy"]:.4f}'
    # The console: the promote step's own line, then the demo's, both accuracies and the override flag in each.
    assert re.search(rf'^  \[pipeline\] \[promote\] Not promoted: its test accuracy {accuracy} is below {baseline} '
                     rf'of version 1 \(1 000 test images, sha256 [0-9a-f]{{8}}\); --force_export exports it anyway\.$',
                     text, re.MULTILINE)
    # Under it, the paired evidence; the report shows both models' accuracy per digit.
    assert re.search(rf'^  \[pipeline\] \[promote\]   candidate {accuracy}, version 1 {baseline} on 1 000 test images',
                     text, re.MULTILINE)
    assert entry['per_digit']['columns'] == ['version 1', 'candidate', 'change'] and len(entry['per_digit']['rows']) == 11
    assert 'Per digit, pipeline run (not promoted):' in page_text(page)
    assert (f'  [pipeline] declined: its model scored {accuracy}, below the {baseline} of version 1; version 1 is '
            f'still served. --force_export would have exported it anyway.') in text.splitlines()
    # The report: its headline counts it, a note says it in words, its row is marked.
    assert 'versions<b>2 promoted, 1 declined</b>' in page
    words = page_text(page)
    assert (f'The promotion rule said no to the pipeline run: its model scored test accuracy {accuracy}, below the '
            f'{baseline} of version 1. Version 1 is still the one served; --force_export would have exported it '
            f'anyway.') in words
    assert '<span class="status declined">declined</span>' in page


def test_report_and_summary_agree(quick_demo):
    summary, page = quick_demo['summary'], quick_demo['page']
    served = summary['served']
    assert f'served version {served["version"]}<b>{served["accuracy"]:.4f}</b>' in page
    assert f'{len(STAGES)} of {len(STAGES)} succeeded' in page
    words = page_text(page)
    for stage in summary['stages']:
        assert stage['title'] in page and stage['commands']
        for command in stage['commands']:
            assert command in words
    for trial in summary['tuning']['trials']:
        assert f'{trial["accuracy"]:.4f}' in page
    assert page.count('src="data:image/png;base64,') == 3 + 10, \
        'tuning and drift charts, notebook figure and ten digits, inline'
    assert not re.search(r'(src|href)="(https?:)?//', page), 'the page fetches nothing'
    answers = summary['predict_image']
    assert [answer['sent'] for answer in answers] == list(range(10))
    assert sum(answer['digit'] == answer['sent'] for answer in answers) >= 8
    assert summary['notebook']['lines'][0].startswith('sent [1, 3, 9] -> predicted [')
    assert os.path.isfile(os.path.join(quick_demo['dir'], 'notebook', 'model_serve.ipynb'))


def test_the_drift_stage_shows_clean_traffic_calm_and_rotated_digits_alerted(quick_demo):
    drift = quick_demo['summary']['drift']
    clean = [point for point in drift['points'] if point['sent'] <= drift['clean_sent']]
    assert clean and not any(point['alert'] for point in clean)
    assert all(score < drift['thresholds'][name] for point in clean for name, score in point['scores'].items())
    assert drift['alert_after'] is not None and 0 < drift['alert_after'] <= drift['shifted_sent']
    assert drift['shifted_accuracy'] < drift['clean_accuracy'] - 0.2
    assert f'[drift] alert after {drift["alert_after"]} rotated digits: ' in quick_demo['text']
    words = page_text(quick_demo['page'])
    assert f'the alert started after {drift["alert_after"]} of them' in words
    assert 'What an operator does next:' in words


def test_the_report_reads_whole_words_in_a_browser_at_1280_and_1920_px(quick_demo):
    browser = browser_for('read the report')
    found = {}
    try:
        for width in report_page.WIDTHS:
            report_page.open_report(browser, os.path.join(quick_demo['dir'], 'report.html'), width)
            found[width] = report_page.layout(browser)
    finally:
        browser.close()
    assert list(found) == [1280, 1920]
    for width, layout in found.items():
        assert layout['words'] > 500, width
        assert layout['problems'] == [], width


def test_the_chart_legend_covers_no_bar_or_value():
    trials = [{'trial': f'trial-{number:02d}', 'status': 'succeeded', 'accuracy': accuracy}
              for number, accuracy in enumerate([0.9612, 0.9731, 0.9655, 0.9702, 0.9689, 0.9831], 1)]
    figure = demo_report.draw_accuracy_chart(trials, 0.965, 'trial-06')
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        (axes,) = figure.axes
        legend = axes.get_legend().get_window_extent(renderer)
        assert axes.get_legend().get_texts()[0].get_text() == 'goal 0.965'
        drawn = list(axes.patches) + list(axes.texts)
        assert len(drawn) == 2 * len(trials)
        for artist in drawn:
            assert not legend.overlaps(artist.get_window_extent(renderer)), artist
        assert not legend.overlaps(axes.get_window_extent(renderer))
        # The legend is inside the picture.
        assert figure.bbox.contains(legend.x0, legend.y0) and figure.bbox.contains(legend.x1, legend.y1)
    finally:
        import matplotlib.pyplot as plt
        plt.close(figure)


def test_no_process_is_left_running_and_no_temporary_file(quick_demo):
    assert processes_mentioning(quick_demo['dir']) == []
    # The local pipeline run's folder and program files included.
    assert os.listdir(quick_demo['temporary']) == []
    with pytest.raises(ProcessLookupError):
        os.kill(quick_demo['summary']['served']['pid'], 0)


def test_ctrl_c_stops_both_running_stages_and_writes_the_report_so_far(tmp_path):
    report_dir = str(tmp_path / 'report')
    process = start_demo('--quick', '--output', report_dir)
    lines = []
    for line in process.stdout:
        lines.append(line)
        # The tuner has printed its first line: it and the pipeline run side by side now.
        if line.startswith('  [tune] '):
            break
    process.send_signal(signal.SIGINT)
    lines += process.stdout.readlines()
    assert process.wait(timeout=60) == 130, ''.join(lines)
    assert '[pipeline] interrupted: stopping ...' in ''.join(lines)
    assert lines[-1].startswith('Demo interrupted in ')
    with open(os.path.join(report_dir, 'summary.json'), encoding='utf-8') as summary_file:
        stages = {stage['name']: stage['status'] for stage in json.load(summary_file)['stages']}
    assert stages == dict({name: 'not run' for name in STAGES}, train='succeeded', pipeline='interrupted',
                          tune='interrupted')
    assert 'interrupted' in open(os.path.join(report_dir, 'report.html'), encoding='utf-8').read()
    assert not [name for name in os.listdir(os.path.join(report_dir, 'serving')) if name.startswith('.tmp-')]
    assert processes_mentioning(report_dir) == []


def test_an_existing_report_folder_is_refused(tmp_path):
    (tmp_path / 'old.txt').write_text('x')
    process = subprocess.run([sys.executable, RUN_DEMO, '--quick', '--output', str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 1
    assert process.stderr == (f'run_demo.py: error: {tmp_path} exists and is not an empty folder: choose another '
                              f'--output\n')
    assert os.listdir(tmp_path) == ['old.txt']


def test_the_report_marks_a_failed_stage():
    stages = [{'name': name, 'title': name.capitalize(), 'status': 'not run', 'seconds': None, 'commands': [],
               'cluster_command': 'kubectl ...', 'log': f'logs/{name}.log'} for name in STAGES]
    stages[0].update(status='succeeded', seconds=3.0, commands=['python3 mnist_model/mnist.py'])
    stages[1].update(status='failed', seconds=1.5, commands=['python3 mnist_model/mnist_pipeline.py --run-local'],
                     error='exit code 1: mnist_pipeline.py: error: step train failed: disk full')
    summary = {'started_at': '2026-11-26T12:00:00Z', 'mode': 'quick', 'report_dir': 'demo-report/x',
               'serving_dir': 'demo-report/x/serving', 'seconds': 4.5, 'stages': stages, 'versions': [],
               'tuning': None, 'served': None, 'notebook': None, 'predict_image': None}
    page = demo_report.render(summary)
    assert '<span class="status failed">failed</span> ' in page
    assert 'failed exit code 1: mnist_pipeline.py: error: step train failed: disk full' in \
        page_text(page)
    assert '1 of 8 succeeded; pipeline failed' in page
    assert page.count('<span class="status not-run">not run</span>') == 6


def test_a_failed_stage_stops_the_run_with_one_line_and_the_report_so_far(tmp_path, capsys, monkeypatch):
    import run_demo

    demo = run_demo.Demo(str(tmp_path / 'report'), str(tmp_path / 'serving'), quick=True, trials=2, parallel=2,
                         echo=print)
    os.makedirs(demo.serving_dir)
    ran = []
    monkeypatch.setattr(demo, 'train', lambda: ran.append('train'))

    def fail():
        ran.append('pipeline')
        raise run_demo.StageFailed('exit code 1: mnist_pipeline.py: error: step train failed: disk full')

    monkeypatch.setattr(demo, 'pipeline', fail)
    monkeypatch.setattr(demo, 'start_tune', lambda: ran.append('start_tune'))
    monkeypatch.setattr(demo, 'tune', lambda: ran.append('tune'))
    assert demo.run(keep_serving=False) == 1
    assert ran == ['train', 'start_tune', 'pipeline']
    error = capsys.readouterr().err
    assert error == (f'run_demo.py: error: stage pipeline failed: exit code 1: mnist_pipeline.py: error: step train '
                     f'failed: disk full (log: {os.path.join(str(tmp_path), "report", "logs", "pipeline.log")})\n')
    with open(tmp_path / 'report' / 'summary.json', encoding='utf-8') as summary_file:
        stages = {stage['name']: stage['status'] for stage in json.load(summary_file)['stages']}
    # The tuning, started beside the pipeline, is stopped with it.
    assert stages == dict({name: 'not run' for name in STAGES}, train='succeeded', pipeline='failed', tune='stopped')
    assert 'disk full' in page_text((tmp_path / 'report' / 'report.html').read_text())
