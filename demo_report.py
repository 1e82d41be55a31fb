"""Render the report of a demo run (run_demo.py) as one self-contained HTML page, from its summary.json.

run_demo.py calls render() after every stage; the page can also be made again from the numbers:

    python3 demo_report.py demo-report/20261126-120000/summary.json     # rewrites report.html beside it

The page's layout and styles are demo_report.html; this file fills in its tables, the accuracy chart (drawn with
matplotlib, inlined as a PNG) and the confusion matrix. Nothing on the page is fetched from anywhere. Every value from
summary.json is escaped before it reaches the page, and a field that does not hold what it should (a text, null, NaN
or a list where a number belongs) is shown as "invalid" instead of stopping the page.
"""
import argparse
import base64
import functools
import html
import io
import json
import math
import os
import re
import string
import sys

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_report.html')
HYPERPARAMETERS = ('num_hidden_layer_1', 'num_hidden_layer_2', 'dropout', 'learning_rate', 'epoch')
SOURCES = {'train': 'notebook training', 'pipeline': 'pipeline run', 'retrain': 'retrain with tuned values'}


# What a malformed field of summary.json shows; a section whose data is malformed as a whole shows a note instead.
INVALID = '<span class="invalid">invalid</span>'
# A link target that is a file of the report folder (logs/train.log): no scheme (javascript:, https:), no host.
LOCAL_LINK = re.compile(r'\w[\w.-]*(/[\w.-]+)*')
# An inline picture's data as summary.json holds it: base64 text and nothing else, which cannot leave its attribute.
BASE64_TEXT = re.compile(r'[A-Za-z0-9+/]*={0,2}')


def escape(value):
    return html.escape(str(value))


def is_number(value):
    """Whether a field of summary.json holds a finite number (not a text, null, NaN, a list or true)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(value, template='{:.4f}'):
    """A number of summary.json formatted by template, or INVALID for anything else."""
    return escape(template.format(value)) if is_number(value) else INVALID


def integer(value):
    """A whole number of summary.json (a version, a count, a digit), or INVALID."""
    return escape(value) if isinstance(value, int) and not isinstance(value, bool) else INVALID


def source_name(source):
    """The words for the stage that made a version ('pipeline run'), escaped."""
    return escape(SOURCES.get(source, source) if isinstance(source, str) else source)


def malformed_as_invalid(section):
    """A section of the page that shows a one-line note, instead of stopping the whole page, when its part of
    summary.json has the wrong shape (a missing key, a text where a list belongs)."""
    @functools.wraps(section)
    def render_section(*values):
        try:
            return section(*values)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            return (f'<p class="note">{INVALID}: this part of summary.json is malformed '
                    f'({escape(type(error).__name__)}: {escape(error)}).</p>')
    return render_section


def words(value):
    """Escaped text whose lines may wrap at its spaces only: each word (a flag, a path, a name) stays whole."""
    return ' '.join(f'<span class="word">{escape(word)}</span>' if word else '' for word in str(value).split(' '))


def table(headers, rows, row_classes=None, table_class=''):
    """An HTML table; cells are HTML already (escape text before), numbers are right-aligned."""
    head = ''.join(f'<th>{escape(header)}</th>' for header in headers)
    body = []
    for index, row in enumerate(rows):
        row_class = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ''
        cells = ''.join(f'<td class="number">{cell}</td>' if isinstance(cell, (int, float)) else f'<td>{cell}</td>'
                        for cell in row)
        body.append(f'<tr{row_class}>{cells}</tr>')
    class_attribute = f' class="{table_class}"' if table_class else ''
    return f'<table{class_attribute}><tr>{head}</tr>{"".join(body)}</table>'


def badge(text):
    text = str(text)
    return f'<span class="status {escape(text.replace(" ", "-"))}">{escape(text)}</span>'


def code(text):
    return f'<code class="words">{words(text)}</code>'


def command_block(text):
    """A command on a line of its own: it wraps at spaces, and a word wider than the cell scrolls inside it."""
    return f'<div class="command">{code(text)}</div>'


def log_link(path):
    """A link to a file of the report folder, or just its name when it is not one (a javascript: or web address)."""
    if not isinstance(path, str) or not LOCAL_LINK.fullmatch(path):
        return escape(path)
    return f'<a href="{escape(path)}">{escape(path)}</a>'


@malformed_as_invalid
def stages_table(stages):
    """One row per stage, and under it the commands that do the same by hand and on a cluster, each on its own line
    after its label (a stage that did not run has no command by hand yet)."""
    rows = []
    for index, stage in enumerate(stages, 1):
        status = badge(stage['status'])
        if stage.get('error'):
            status += f' {words(stage["error"])}'
        seconds = '-' if stage.get('seconds') is None else number(stage['seconds'], '{:.1f}')
        commands = stage.get('commands') or []
        log = log_link(stage.get('log')) if commands else '-'
        by_hand = (''.join(command_block(command) for command in commands) if isinstance(commands, list)
                   else INVALID)
        by_hand = f'<div>by hand:</div>{by_hand}' if by_hand else '<div>by hand: -</div>'
        rows.append(f'<tr class="stage"><td>{index}</td><td><b>{escape(stage["title"])}</b></td><td>{status}</td>'
                    f'<td class="number">{seconds}</td><td class="name">{log}</td></tr>'
                    f'<tr><td></td><td colspan="4">{by_hand}<div>on a Kubeflow cluster:</div>'
                    f'{command_block(stage.get("cluster_command", "-"))}</td></tr>')
    # Fixed column widths: a long command scrolls inside its cell instead of widening the page.
    columns = ''.join(f'<col style="width: {width}">' for width in ('2.5rem', 'auto', '8rem', '7.5rem', '10.5rem'))
    head = '<tr><th>#</th><th>stage</th><th>status</th><th>wall time (s)</th><th>log</th></tr>'
    return f'<table class="stages"><colgroup>{columns}</colgroup>{head}{"".join(rows)}</table>'


@malformed_as_invalid
def declined_notes(versions):
    """A line per candidate the promotion rule refused: both accuracies, the version still served, the override."""
    notes = []
    for entry in versions:
        if entry['decision'] != 'not promoted' or 'baseline_accuracy' not in entry:
            continue
        kept = entry.get('served_after')
        still = (f'Version <b>{integer(kept)}</b> is still the one served' if kept == entry.get('served_before')
                 else f'Version <b>{integer(kept)}</b> is served now')
        notes.append(f'<p class="declined-note"><b>The promotion rule said no</b> to the '
                     f'{source_name(entry.get("source"))}: its model scored test accuracy '
                     f'<b>{number(entry.get("accuracy"))}</b>, below the <b>{number(entry["baseline_accuracy"])}</b> '
                     f'of version {integer(entry.get("baseline_version"))}. {still}; '
                     f'{code(entry.get("override", "--force_export"))} would have exported it anyway.</p>')
    return ''.join(notes)


@malformed_as_invalid
def versions_table(versions, served):
    if not versions:
        return '<p class="note">No model was exported yet.</p>'
    served_version = served.get('version') if isinstance(served, dict) else None
    rows, classes = [], []
    for entry in versions:
        is_served = served_version is not None and entry.get('version') == served_version
        version = 'not promoted' if entry.get('version') is None else integer(entry['version'])
        version += ' (served)' if is_served else ''
        baseline = '-' if entry.get('served_before') is None else f'version {integer(entry["served_before"])}'
        decision = entry.get('decision')
        rows.append([f'<span class="word">{version}</span>', number(entry.get('accuracy')), baseline,
                     source_name(entry.get('source')),
                     badge('declined' if decision == 'not promoted' else decision), words(entry.get('message', ''))])
        classes.append('best' if is_served else 'declined-row' if decision == 'not promoted' else '')
    return declined_notes(versions) + table(
        ['version', 'test accuracy', 'served before', 'from', 'decision', 'what the promote step said'], rows,
        classes) + per_digit_tables(versions)


def per_digit_tables(versions):
    """For each decision made against a served version: both models' accuracy per digit, as the gate measured them
    on the same test images, one row per model (and the change), one column per digit."""
    sections = []
    for entry in versions:
        evidence = entry.get('per_digit')
        if not isinstance(evidence, dict) or len(evidence.get('columns') or []) < 2:
            continue
        columns, rows = evidence['columns'], evidence['rows']
        labels = [str(row[0]) for row in rows]
        lines = [[escape(column)] + [number(row[1 + position], '{:+.4f}' if column == 'change' else '{:.4f}')
                                     for row in rows] for position, column in enumerate(columns)]
        version = 'not promoted' if entry.get('version') is None else f'version {integer(entry["version"])}'
        sections.append(f'<p class="note">Per digit, {source_name(entry.get("source"))} ({version}):</p>'
                        + table(['model', *labels], lines, table_class='per-digit'))
    return ''.join(sections)


@functools.lru_cache(maxsize=4)
def accuracy_chart(trials_json, goal, best):
    """The chart of draw_accuracy_chart for trials given as JSON (so that a report written after every stage draws
    it once), as PNG bytes."""
    import matplotlib.pyplot as plt

    figure = draw_accuracy_chart(json.loads(trials_json), goal, best)
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png')
    plt.close(figure)
    return buffer.getvalue()


def draw_accuracy_chart(trials, goal, best):
    """A matplotlib figure: a bar of the test accuracy of each succeeded trial (the best one green) with its value,
    and the goal (unless None) as a dashed line named in a legend beside the axes, where it cannot cover a bar."""
    import matplotlib
    matplotlib.use('Agg')  # No screen: draw into memory.
    import matplotlib.pyplot as plt

    succeeded = [trial for trial in trials if trial['status'] == 'succeeded']
    names = [trial['trial'] for trial in succeeded]
    accuracies = [trial['accuracy'] for trial in succeeded]
    figure, axes = plt.subplots(figsize=(7.5, 3.2), dpi=100)
    colours = ['tab:green' if name == best else 'tab:blue' for name in names]
    axes.bar(names, accuracies, color=colours)
    for position, accuracy in enumerate(accuracies):
        axes.text(position, accuracy, f'{accuracy:.4f}', ha='center', va='bottom', fontsize=8)
    goals = [] if goal is None else [goal]
    for line in goals:
        axes.axhline(line, color='tab:red', linestyle='--', linewidth=1, label=f'goal {line}')
    low = min(accuracies + goals, default=0.0)
    axes.set_ylim(max(0.0, low - (1 - low) * 0.6), 1.0)
    axes.set_ylabel('test accuracy')
    axes.set_title('Test accuracy per trial (best in green)')
    if goals:
        axes.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    return figure


def png_image(png_bytes_or_base64, alt, css_class='figure'):
    """An inline PNG from its bytes or base64 text; INVALID if summary.json holds anything else there."""
    if isinstance(png_bytes_or_base64, bytes):
        data = base64.b64encode(png_bytes_or_base64).decode('ascii')
    elif isinstance(png_bytes_or_base64, str) and BASE64_TEXT.fullmatch(png_bytes_or_base64):
        data = png_bytes_or_base64
    else:
        return INVALID
    return f'<img class="{css_class}" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


@malformed_as_invalid
def tuning_section(tuning):
    if not tuning:
        return '<p class="note">Not run.</p>'
    trials = sorted(tuning['trials'], key=lambda trial: (
        trial.get('status') != 'succeeded', -trial['accuracy'] if is_number(trial.get('accuracy')) else 0))
    rows, classes = [], []
    for rank, trial in enumerate(trials, 1):
        succeeded = trial.get('status') == 'succeeded'
        name = f'<span class="word">{escape(trial.get("trial"))}</span>'
        rows.append([str(rank), name, number(trial.get('accuracy')) if succeeded else '-',
                     number(trial.get('loss')) if succeeded else '-'] +
                    [number(trial.get(name), '{}') for name in HYPERPARAMETERS] +
                    ['-' if trial.get('seconds') is None else number(trial['seconds'], '{:.0f}'),
                     badge(trial.get('status'))])
        classes.append('best' if trial.get('trial') == tuning.get('best') else '')
    leaderboard = table(['rank', 'trial', 'accuracy', 'loss', *HYPERPARAMETERS, 'wall time (s)', 'status'], rows,
                        classes)
    # The chart shows the trials whose accuracy is a number (the table shows the others as invalid).
    charted = [{'trial': str(trial.get('trial')), 'status': 'succeeded', 'accuracy': trial['accuracy']}
               for trial in trials if trial.get('status') == 'succeeded' and is_number(trial.get('accuracy'))]
    goal = tuning.get('goal') if is_number(tuning.get('goal')) else None
    best = tuning.get('best') if isinstance(tuning.get('best'), str) else ''
    chart = png_image(accuracy_chart(json.dumps(charted), goal, best), 'Test accuracy per trial') if charted else ''
    # A table wider than the page scrolls sideways rather than breaking its names.
    return (f'<p class="note">Local tuner, results in {code(tuning.get("results"))}; the goal (Katib\'s objective) is '
            f'test accuracy {number(tuning.get("goal"), "{}")}.</p><div class="scroll">{leaderboard}</div>{chart}')


def is_confusion_matrix(confusion):
    """Whether summary.json's confusion matrix is 10 rows of 10 counts."""
    return (isinstance(confusion, list) and len(confusion) == 10 and all(
        isinstance(row, list) and len(row) == 10 and all(
            isinstance(count, int) and not isinstance(count, bool) and count >= 0 for count in row)
        for row in confusion))


def confusion_table(confusion):
    """Rows are true digits, columns predicted ones. Correct answers are shaded green by their share of the row;
    errors red on their own scale (relative to the largest error), so that the worst confusions stand out."""
    if not is_confusion_matrix(confusion):
        return f'<p>{INVALID}: the confusion matrix is not 10 rows of 10 counts.</p>'
    largest_error = max([confusion[row][column] for row in range(10) for column in range(10) if row != column] + [1])
    rows = []
    for true_digit in range(10):
        total = max(sum(confusion[true_digit]), 1)
        cells = [f'<th>{true_digit}</th>']
        for predicted in range(10):
            count = confusion[true_digit][predicted]
            if predicted == true_digit:
                style = f'background: rgba(26, 127, 55, {0.15 + 0.6 * count / total:.2f})'
            elif count:
                style = f'background: rgba(207, 34, 46, {0.1 + 0.75 * count / largest_error:.2f})'
            else:
                style = 'color: #8c959f'
            cells.append(f'<td style="{style}">{count}</td>')
        rows.append(f'<tr>{"".join(cells)}</tr>')
    head = '<tr><th>true \\ predicted</th>' + ''.join(f'<th>{digit}</th>' for digit in range(10)) + '</tr>'
    return f'<table class="confusion">{head}{"".join(rows)}</table>'


@malformed_as_invalid
def served_section(served):
    if served and not isinstance(served, dict):
        raise TypeError(f'served is a {type(served).__name__}, not an object')
    if not served or 'accuracy' not in served:
        return '<p class="note">Not served.</p>'
    recorded = served.get('hyperparameters')
    hyperparameters = (code(' '.join(f'--{name}={recorded.get(name)}' for name in HYPERPARAMETERS))
                       if isinstance(recorded, dict) else INVALID)
    return (f'<p>Version <b>{integer(served.get("version"))}</b> answered at {code(served.get("url"))}: test accuracy '
            f'<b>{number(served["accuracy"])}</b> on {integer(served.get("test_examples"))} test images sent through '
            f'the REST API (its <code>run.json</code> records {number(served.get("recorded_accuracy"))}). Trained '
            f'with {hyperparameters}.</p>'
            f'<p class="note">Confusion matrix of those answers: rows are the true digits, columns the predicted '
            f'ones; errors are red on their own scale.</p>{confusion_table(served.get("confusion_matrix"))}')


def markdown_table(text):
    """A Markdown pipe table (as the notebook displays it) as an HTML table."""
    lines = [line.strip().strip('|').split('|') for line in str(text).strip().splitlines()]
    rows = [[escape(cell.strip()) for cell in line] for line in lines if not set(''.join(line)) <= set('-: ')]
    return table(rows[0], rows[1:]) if rows else ''


@malformed_as_invalid
def notebook_section(notebook):
    if not notebook:
        return '<p class="note">Not run.</p>'
    parts = [f'<p class="note">Executed copy: {code(notebook.get("executed"))}.</p>']
    lines = notebook.get('lines') or []
    parts += [f'<p>{code(line)}</p>' for line in lines] if isinstance(lines, list) else [f'<p>{INVALID}</p>']
    if notebook.get('figure_png'):
        parts.append(png_image(notebook['figure_png'], 'The notebook\'s figure: digits and probabilities'))
    if notebook.get('table_markdown'):
        parts.append(markdown_table(notebook['table_markdown']))
    return '\n'.join(parts)


@malformed_as_invalid
def predict_image_section(answers):
    if not answers:
        return '<p class="note">Not run.</p>'
    tiles = []
    for answer in answers:
        wrong = ' wrong' if answer.get('digit') != answer.get('sent') else ''
        picture = png_image(answer.get('png'), f'test digit {answer.get("sent")}', '')
        tiles.append(f'<div class="digit{wrong}">{picture}<br>sent {integer(answer.get("sent"))}<br>'
                     f'<b>{integer(answer.get("digit"))}</b> ({number(answer.get("confidence"), "{:.1%}")})</div>')
    right = sum(answer.get('digit') == answer.get('sent') for answer in answers)
    return (f'<p>{right} of {len(answers)} recognised ({code("mnist_model/test_data/0.png ... 9.png")} as PNG '
            f'files, base64).</p><div class="digits">{"".join(tiles)}</div>')


def drift_chart(points_json, thresholds_json, clean_sent, alert_after):
    """A line per signal of the drift monitor's scores over the requests sent (the serving_default window), the
    threshold dashed, the first shifted request and the alert marked; PNG bytes."""
    import matplotlib
    matplotlib.use('Agg')  # No screen: draw into memory.
    import matplotlib.pyplot as plt

    points, thresholds = json.loads(points_json), json.loads(thresholds_json)
    figure, axes = plt.subplots(figsize=(7.5, 3.2), dpi=100)
    sent = [point['sent'] for point in points]
    for name in thresholds:
        axes.plot(sent, [point['scores'][name] if point['scores'][name] is not None else float('nan')
                         for point in points], marker='.', linewidth=1, label=name)
    axes.axhline(min(thresholds.values()), color='tab:red', linestyle='--', linewidth=1, label='threshold')
    axes.axvline(clean_sent, color='grey', linewidth=1)
    axes.text(clean_sent, axes.get_ylim()[1], ' shifted digits from here', va='top', fontsize=8, color='grey')
    if alert_after:
        axes.axvline(clean_sent + alert_after, color='tab:red', linewidth=2)
        axes.text(clean_sent + alert_after, axes.get_ylim()[1] * 0.8, ' alert', va='top', fontsize=8, color='tab:red')
    axes.set_yscale('symlog', linthresh=10)
    axes.set_xlabel('requests sent in this stage')
    axes.set_ylabel('score (-log10 p)')
    axes.set_title('Drift scores over the last window of inputs')
    axes.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png')
    plt.close(figure)
    return buffer.getvalue()


@malformed_as_invalid
def drift_section(drift):
    """The drift stage: its chart, each signal's last score against its threshold, and what an operator does next;
    every value escaped, a malformed one shown as invalid."""
    if not drift:
        return '<p class="note">Not run.</p>'
    chart = png_image(drift_chart(json.dumps(drift['points']), json.dumps(drift['thresholds']), drift['clean_sent'],
                                  drift['alert_after']), 'Drift scores over the requests')
    last = drift['points'][-1]['scores']
    rows = [[escape(name), number(last[name], '{:.2f}') if last[name] is not None else '',
             number(drift['thresholds'][name], '{:g}')] for name in drift['thresholds']]
    alert = (f'the alert started after <b>{integer(drift["alert_after"])}</b> of them' if drift['alert_after']
             else '<b>no alert</b> started')
    return (f'<p>{integer(drift["clean_sent"])} test digits in random order, then {integer(drift["shifted_sent"])} of '
            f'them {escape(drift["shift"])} (turned by 25 to 45 degrees), one per request to '
            f'<code>serving_default</code>: the served model answered {number(drift["clean_accuracy"], "{:.1%}")} of '
            f'the clean ones right and {number(drift["shifted_accuracy"], "{:.1%}")} of the {escape(drift["shift"])} '
            f'ones, while every serving metric stayed as it was; {alert}. Scores are -log10 of each test\'s p-value '
            f'over the last {integer(drift["window"])} inputs, computed every {integer(drift["step"])}th input '
            f'({code(drift["url"])}).</p>{chart}'
            f'{table(["signal", "score at the end", "threshold"], rows)}'
            '<p><b>What an operator does next:</b> look at which signals moved and for which clients; collect and '
            'label a sample of the drifting requests; run the pipeline with a <code>data_url</code> that holds them; '
            'the promotion rule serves the new version only if it is at least as good, and it brings its own profile '
            '(docs/monitoring.md). On the cluster the same monitor runs beside the InferenceService, fed by KServe\'s '
            'payload logger, and the PrometheusRule <code>MnistModelDrift</code> fires.</p>')


@malformed_as_invalid
def headline(summary):
    stages = summary['stages']
    failed = [stage for stage in stages if stage.get('status') in ('failed', 'interrupted')]
    cards = [('stages', escape(f'{sum(stage.get("status") == "succeeded" for stage in stages)} of {len(stages)} '
                               f'succeeded' + (f'; {failed[0].get("name")} {failed[0]["status"]}' if failed else '')))]
    served = summary.get('served')
    if isinstance(served, dict) and 'accuracy' in served:
        cards.append((f'served version {integer(served.get("version"))}', number(served['accuracy'])))
    versions = summary['versions']
    promoted = sum(entry.get('version') is not None for entry in versions)
    cards.append(('versions', f'{promoted} promoted, {len(versions) - promoted} declined'))
    # The labels and values are HTML already: escaped, or made by number() and integer().
    return ''.join(f'<div class="card">{label}<b>{value}</b></div>' for label, value in cards)


def render(summary):
    """The whole page for a run's summary (run_demo.py's summary.json); raises ValueError if it is not a JSON
    object. Each value is escaped, and a malformed one shows as invalid."""
    if not isinstance(summary, dict):
        raise ValueError('not a JSON object')
    with open(TEMPLATE, encoding='utf-8') as template_file:
        template = string.Template(template_file.read())
    return template.substitute(
        started_at=escape(summary.get('started_at')), mode=escape(str(summary.get('mode')).capitalize()),
        seconds=number(summary.get('seconds', 0), '{}'), stage_seconds=number(summary.get('stage_seconds', 0), '{}'),
        headline=headline(summary), stages=stages_table(summary.get('stages')),
        serving_dir=code(summary.get('serving_dir')),
        versions=versions_table(summary.get('versions'), summary.get('served')),
        tuning=tuning_section(summary.get('tuning')), served=served_section(summary.get('served')),
        notebook=notebook_section(summary.get('notebook')),
        predict_image=predict_image_section(summary.get('predict_image')),
        drift=drift_section(summary.get('drift')),
        tensorboard=code(f'tensorboard --logdir {os.path.join(str(summary.get("report_dir")), "tensorboard")}'))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('summary', help='a summary.json written by run_demo.py')
    args = parser.parse_args(argv)
    try:
        with open(args.summary, encoding='utf-8') as summary_file:
            summary = json.load(summary_file)
        page = render(summary)
        path = os.path.join(os.path.dirname(os.path.abspath(args.summary)), 'report.html')
        with open(path, 'w', encoding='utf-8') as report_file:
            report_file.write(page)
    except (OSError, ValueError, KeyError) as error:
        print(f'demo_report.py: error: {args.summary}: {type(error).__name__}: {error}', file=sys.stderr)
        return 1
    print(f'Wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
