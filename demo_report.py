"""Render the report of a demo run (run_demo.py) as one self-contained HTML page, from its summary.json.

run_demo.py calls render() after every stage; the page can also be made again from the numbers:

    python3 demo_report.py demo-report/20261126-120000/summary.json     # rewrites report.html beside it

The page's layout and styles are demo_report.html; this file fills in its tables, the accuracy chart (drawn with
matplotlib, inlined as a PNG) and the confusion matrix. Nothing on the page is fetched from anywhere.
"""
import argparse
import base64
import functools
import html
import io
import json
import os
import string
import sys

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_report.html')
HYPERPARAMETERS = ('num_hidden_layer_1', 'num_hidden_layer_2', 'dropout', 'learning_rate', 'epoch')
SOURCES = {'train': 'notebook training', 'pipeline': 'pipeline run', 'retrain': 'retrain with tuned values'}


def escape(value):
    return html.escape(str(value))


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
    return f'<span class="status {escape(text.replace(" ", "-"))}">{escape(text)}</span>'


def code(text):
    return f'<code class="words">{words(text)}</code>'


def command_block(text):
    """A command on a line of its own: it wraps at spaces, and a word wider than the cell scrolls inside it."""
    return f'<div class="command">{code(text)}</div>'


def stages_table(stages):
    """One row per stage, and under it the commands that do the same by hand and on a cluster."""
    rows = []
    for number, stage in enumerate(stages, 1):
        status = badge(stage['status'])
        if stage.get('error'):
            status += f' {words(stage["error"])}'
        seconds = f'{stage["seconds"]:.1f}' if stage['seconds'] is not None else '-'
        log = f'<a href="{escape(stage["log"])}">{escape(stage["log"])}</a>' if stage['commands'] else '-'
        by_hand = ''.join(command_block(command) for command in stage['commands']) or '-'
        rows.append(f'<tr class="stage"><td>{number}</td><td><b>{escape(stage["title"])}</b></td><td>{status}</td>'
                    f'<td class="number">{seconds}</td><td class="name">{log}</td></tr>'
                    f'<tr><td></td><td colspan="4">by hand: {by_hand}on a Kubeflow cluster: '
                    f'{command_block(stage["cluster_command"])}</td></tr>')
    # Fixed column widths: a long command scrolls inside its cell instead of widening the page.
    columns = ''.join(f'<col style="width: {width}">' for width in ('2.5rem', 'auto', '8rem', '7.5rem', '10.5rem'))
    head = '<tr><th>#</th><th>stage</th><th>status</th><th>wall time (s)</th><th>log</th></tr>'
    return f'<table class="stages"><colgroup>{columns}</colgroup>{head}{"".join(rows)}</table>'


def declined_notes(versions):
    """A line per candidate the promotion rule refused: both accuracies, the version still served, the override."""
    notes = []
    for entry in versions:
        if entry['decision'] != 'not promoted' or 'baseline_accuracy' not in entry:
            continue
        kept = entry.get('served_after')
        still = (f'Version <b>{kept}</b> is still the one served' if kept == entry.get('served_before')
                 else f'Version <b>{kept}</b> is served now')
        notes.append(f'<p class="declined-note"><b>The promotion rule said no</b> to the '
                     f'{escape(SOURCES.get(entry["source"], entry["source"]))}: its model scored test accuracy '
                     f'<b>{entry["accuracy"]:.4f}</b>, below the <b>{entry["baseline_accuracy"]:.4f}</b> of version '
                     f'{entry["baseline_version"]}. {still}; {code(entry.get("override", "--force_export"))} would '
                     f'have exported it anyway.</p>')
    return ''.join(notes)


def versions_table(versions, served):
    if not versions:
        return '<p class="note">No model was exported yet.</p>'
    rows, classes = [], []
    for entry in versions:
        version = str(entry['version']) if entry['version'] else 'not promoted'
        if served and entry['version'] == served.get('version'):
            version += ' (served)'
        baseline = '-' if entry.get('served_before') is None else f'version {entry["served_before"]}'
        rows.append([f'<span class="word">{escape(version)}</span>', f'{entry["accuracy"]:.4f}', escape(baseline),
                     escape(SOURCES.get(entry['source'], entry['source'])),
                     badge({'not promoted': 'declined'}.get(entry['decision'], entry['decision'])),
                     words(entry['message'])])
        classes.append('best' if served and entry['version'] == served.get('version') else
                       'declined-row' if entry['decision'] == 'not promoted' else '')
    return declined_notes(versions) + table(
        ['version', 'test accuracy', 'served before', 'from', 'decision', 'what the promote step said'], rows, classes)


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
    and the goal as a dashed line named in a legend beside the axes, where it cannot cover a bar."""
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
    axes.axhline(goal, color='tab:red', linestyle='--', linewidth=1, label=f'goal {goal}')
    low = min(accuracies + [goal])
    axes.set_ylim(max(0.0, low - (1 - low) * 0.6), 1.0)
    axes.set_ylabel('test accuracy')
    axes.set_title('Test accuracy per trial (best in green)')
    axes.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    return figure


def png_image(png_bytes_or_base64, alt, css_class='figure'):
    data = png_bytes_or_base64 if isinstance(png_bytes_or_base64, str) else \
        base64.b64encode(png_bytes_or_base64).decode('ascii')
    return f'<img class="{css_class}" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def tuning_section(tuning):
    if not tuning:
        return '<p class="note">Not run.</p>'
    trials = sorted(tuning['trials'], key=lambda trial: (trial['status'] != 'succeeded', -(trial['accuracy'] or 0)))
    rows, classes = [], []
    for rank, trial in enumerate(trials, 1):
        succeeded = trial['status'] == 'succeeded'
        name = f'<span class="word">{escape(trial["trial"])}</span>'
        rows.append([str(rank), name, f'{trial["accuracy"]:.4f}' if succeeded else '-',
                     f'{trial["loss"]:.4f}' if succeeded else '-'] +
                    [escape(trial[name]) for name in HYPERPARAMETERS] +
                    [f'{trial["seconds"]:.0f}' if trial.get('seconds') is not None else '-', badge(trial['status'])])
        classes.append('best' if trial['trial'] == tuning['best'] else '')
    leaderboard = table(['rank', 'trial', 'accuracy', 'loss', *HYPERPARAMETERS, 'wall time (s)', 'status'], rows,
                        classes)
    chart = png_image(accuracy_chart(json.dumps(tuning['trials']), tuning['goal'], tuning['best']),
                      'Test accuracy per trial')
    # A table wider than the page scrolls sideways rather than breaking its names.
    return (f'<p class="note">Local tuner, results in {code(tuning["results"])}; the goal (Katib\'s objective) is '
            f'test accuracy {tuning["goal"]}.</p><div class="scroll">{leaderboard}</div>{chart}')


def confusion_table(confusion):
    """Rows are true digits, columns predicted ones. Correct answers are shaded green by their share of the row;
    errors red on their own scale (relative to the largest error), so that the worst confusions stand out."""
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


def served_section(served):
    if not served or 'accuracy' not in served:
        return '<p class="note">Not served.</p>'
    hyperparameters = ' '.join(f'--{name}={served["hyperparameters"][name]}' for name in HYPERPARAMETERS)
    return (f'<p>Version <b>{served["version"]}</b> answered at {code(served["url"])}: test accuracy '
            f'<b>{served["accuracy"]:.4f}</b> on {served["test_examples"]} test images sent through the REST API '
            f'(its <code>run.json</code> records {served["recorded_accuracy"]:.4f}). Trained with '
            f'{code(hyperparameters)}.</p>'
            f'<p class="note">Confusion matrix of those answers: rows are the true digits, columns the predicted '
            f'ones; errors are red on their own scale.</p>{confusion_table(served["confusion_matrix"])}')


def markdown_table(text):
    """A Markdown pipe table (as the notebook displays it) as an HTML table."""
    lines = [line.strip().strip('|').split('|') for line in text.strip().splitlines()]
    rows = [[escape(cell.strip()) for cell in line] for line in lines if not set(''.join(line)) <= set('-: ')]
    return table(rows[0], rows[1:]) if rows else ''


def notebook_section(notebook):
    if not notebook:
        return '<p class="note">Not run.</p>'
    parts = [f'<p class="note">Executed copy: {code(notebook["executed"])}.</p>']
    parts += [f'<p>{code(line)}</p>' for line in notebook['lines']]
    if notebook['figure_png']:
        parts.append(png_image(notebook['figure_png'], 'The notebook\'s figure: digits and probabilities'))
    if notebook['table_markdown']:
        parts.append(markdown_table(notebook['table_markdown']))
    return '\n'.join(parts)


def predict_image_section(answers):
    if not answers:
        return '<p class="note">Not run.</p>'
    tiles = []
    for answer in answers:
        wrong = ' wrong' if answer['digit'] != answer['sent'] else ''
        picture = png_image(answer['png'], f'test digit {answer["sent"]}', '')
        tiles.append(f'<div class="digit{wrong}">{picture}'
                     f'<br>sent {answer["sent"]}<br><b>{answer["digit"]}</b> ({answer["confidence"]:.1%})</div>')
    right = sum(answer['digit'] == answer['sent'] for answer in answers)
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


def drift_section(drift):
    if not drift:
        return '<p class="note">Not run.</p>'
    chart = png_image(drift_chart(json.dumps(drift['points']), json.dumps(drift['thresholds']), drift['clean_sent'],
                                  drift['alert_after']), 'Drift scores over the requests')
    last = drift['points'][-1]['scores']
    rows = [[escape(name), round(last[name], 2) if last[name] is not None else '', drift['thresholds'][name]]
            for name in drift['thresholds']]
    alert = (f'the alert started after <b>{drift["alert_after"]}</b> of them' if drift['alert_after']
             else '<b>no alert</b> started')
    return (f'<p>{drift["clean_sent"]} test digits in random order, then {drift["shifted_sent"]} of them '
            f'{escape(drift["shift"])} (turned by 25 to 45 degrees), one per request to <code>serving_default</code>: '
            f'the served model answered {drift["clean_accuracy"]:.1%} of the clean ones right and '
            f'{drift["shifted_accuracy"]:.1%} of the {escape(drift["shift"])} ones, while every serving metric stayed '
            f'as it was; {alert}. Scores are -log10 of each test\'s p-value over the last {drift["window"]} inputs, '
            f'computed every {drift["step"]}th input ({code(drift["url"])}).</p>{chart}'
            f'{table(["signal", "score at the end", "threshold"], rows)}'
            '<p><b>What an operator does next:</b> look at which signals moved and for which clients; collect and '
            'label a sample of the drifting requests; run the pipeline with a <code>data_url</code> that holds them; '
            'the promotion rule serves the new version only if it is at least as good, and it brings its own profile '
            '(docs/monitoring.md). On the cluster the same monitor runs beside the InferenceService, fed by KServe\'s '
            'payload logger, and the PrometheusRule <code>MnistModelDrift</code> fires.</p>')


def headline(summary):
    failed = [stage for stage in summary['stages'] if stage['status'] in ('failed', 'interrupted')]
    cards = [('stages', f'{sum(stage["status"] == "succeeded" for stage in summary["stages"])} of '
                        f'{len(summary["stages"])} succeeded' + (f'; {failed[0]["name"]} {failed[0]["status"]}'
                                                                  if failed else ''))]
    served = summary.get('served')
    if served and 'accuracy' in served:
        cards.append((f'served version {served["version"]}', f'{served["accuracy"]:.4f}'))
    promoted = sum(entry['version'] is not None for entry in summary['versions'])
    cards.append(('versions', f'{promoted} promoted, {len(summary["versions"]) - promoted} declined'))
    return ''.join(f'<div class="card">{escape(label)}<b>{escape(value)}</b></div>' for label, value in cards)


def render(summary):
    """The whole page for a run's summary (run_demo.py's summary.json)."""
    with open(TEMPLATE, encoding='utf-8') as template_file:
        template = string.Template(template_file.read())
    return template.substitute(
        started_at=escape(summary['started_at']), mode=escape(summary['mode'].capitalize()),
        seconds=escape(summary.get('seconds', 0)), stage_seconds=escape(summary.get('stage_seconds', 0)),
        headline=headline(summary), stages=stages_table(summary['stages']), serving_dir=code(summary['serving_dir']),
        versions=versions_table(summary['versions'], summary.get('served')),
        tuning=tuning_section(summary.get('tuning')), served=served_section(summary.get('served')),
        notebook=notebook_section(summary.get('notebook')),
        predict_image=predict_image_section(summary.get('predict_image')),
        drift=drift_section(summary.get('drift')),
        tensorboard=code(f'tensorboard --logdir {os.path.join(summary["report_dir"], "tensorboard")}'))


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
