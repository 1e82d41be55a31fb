"""Digits drawn as pen strokes, to measure how well the served model reads what people draw on the page.

Each digit 0-9 has two or three hand-authored stroke templates (polylines in a unit box, y pointing down, built
from lines and elliptic arcs), the ways people commonly write it. Seeded variations of them (size from a quarter
to nine tenths of the pad, position, width, slant, a small rotation and a wobble of the pen) become the drawings
in drawn_digits.json: strokes of [x, y] points on a 280 px square pad, in drawing order. This file writes that JSON
and renders drawings as images; the JSON is committed, and a test checks that it regenerates byte-identically.

    python3 tests/drawn_digits.py            # rewrite tests/drawn_digits.json
"""
import io
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DRAWINGS_PATH = os.path.join(HERE, 'drawn_digits.json')
PAD_SIZE = 280
DRAWINGS_PER_DIGIT = 12
SEED = 12


def arc(centre_x, centre_y, radius_x, radius_y, start_degrees, end_degrees, points=16):
    """Points along an elliptic arc; angles in degrees, 0 = right, 90 = down (y points down)."""
    angles = np.radians(np.linspace(start_degrees, end_degrees, points))
    return [[centre_x + radius_x * math.cos(angle), centre_y + radius_y * math.sin(angle)] for angle in angles]


def line(*points):
    return [list(point) for point in points]


def figure_eight():
    """One stroke crossing itself in the middle: the top loop to the right first, then the bottom loop."""
    turns = np.linspace(0.0, 2.0 * math.pi, 41) + 0.35
    return [[0.5 + 0.42 * math.sin(2.0 * turn) * (0.8 if turn % (2 * math.pi) < math.pi else 1.0),
             0.5 - 0.5 * math.cos(turn)] for turn in turns]


# Each template is a list of strokes; a stroke is a list of [x, y] points in the unit box.
TEMPLATES = {
    0: [
        [arc(0.5, 0.5, 0.45, 0.5, -100, 270)],
        [arc(0.5, 0.5, 0.4, 0.5, -60, -420)],
    ],
    1: [
        [line((0.5, 0.0), (0.5, 1.0))],
        [line((0.35, 0.15), (0.6, 0.0), (0.6, 1.0))],
        [line((0.6, 0.0), (0.4, 1.0))],
    ],
    2: [
        [arc(0.5, 0.3, 0.42, 0.3, 190, 380, 14) + line((0.85, 0.45), (0.05, 1.0), (0.95, 1.0))],
        [arc(0.5, 0.28, 0.4, 0.28, 200, 400, 14) + line((0.45, 0.75), (0.1, 1.0), (0.5, 0.95), (0.95, 1.0))],
    ],
    3: [
        [arc(0.45, 0.25, 0.4, 0.25, 200, 450, 14) + arc(0.45, 0.73, 0.45, 0.27, -90, 150, 14)],
        [line((0.05, 0.0), (0.9, 0.0), (0.4, 0.42)) + arc(0.45, 0.7, 0.45, 0.3, -70, 160, 14)],
    ],
    4: [
        [line((0.65, 0.0), (0.0, 0.65), (0.95, 0.65)), line((0.72, 0.3), (0.72, 1.0))],
        [line((0.15, 0.0), (0.08, 0.55), (0.92, 0.55)), line((0.78, 0.0), (0.78, 1.0))],
        [line((0.2, 0.0), (0.1, 0.5), (0.9, 0.5)), line((0.75, 0.05), (0.7, 1.0))],
    ],
    5: [
        [line((0.2, 0.02), (0.14, 0.45)) + arc(0.45, 0.68, 0.45, 0.3, -150, 150, 16), line((0.2, 0.02), (0.9, 0.0))],
        [line((0.9, 0.0), (0.2, 0.0), (0.15, 0.42)) + arc(0.45, 0.68, 0.42, 0.32, -150, 160, 16)],
    ],
    6: [
        [arc(1.05, 0.65, 0.9, 0.65, -110, -180, 10) + arc(0.5, 0.7, 0.42, 0.3, 180, 540, 20)[1:]],
        [line((0.75, 0.0), (0.25, 0.45)) + arc(0.5, 0.7, 0.4, 0.3, 200, 560, 20)],
    ],
    7: [
        [line((0.05, 0.0), (0.95, 0.0), (0.35, 1.0))],
        [line((0.05, 0.1), (0.9, 0.05), (0.5, 1.0))],
        [line((0.0, 0.0), (0.95, 0.0), (0.45, 1.0)), line((0.35, 0.5), (0.85, 0.5))],
    ],
    8: [
        [arc(0.5, 0.25, 0.35, 0.25, 0, 360, 18), arc(0.5, 0.73, 0.42, 0.27, -90, 270, 18)],
        [figure_eight()],
    ],
    9: [
        [arc(0.5, 0.28, 0.4, 0.28, 0, -360, 18) + line((0.9, 0.28), (0.85, 1.0))],
        [arc(0.5, 0.3, 0.42, 0.3, -20, -380, 18) + arc(-0.2, 0.3, 1.1, 0.7, 0, 70, 8)],
    ],
}


def vary(template, rng):
    """One drawing from a template: strokes of integer [x, y] pad points with seeded size, place, width, slant,
    rotation and wobble, and the digit kept inside the pad."""
    height = rng.uniform(0.25, 0.9) * PAD_SIZE
    width = height * rng.uniform(0.5, 0.8)
    slant = rng.uniform(-0.2, 0.35)
    rotation = math.radians(rng.uniform(-10.0, 10.0))
    strokes = []
    for stroke in template:
        points = np.array(stroke, dtype=np.float64)
        points = points + rng.normal(0.0, 0.012, points.shape)
        x = (points[:, 0] - 0.5) * width
        y = (points[:, 1] - 0.5) * height
        # Slant: the top leans right for a positive value, as in right-leaning handwriting.
        x = x - slant * y
        strokes.append(np.stack([x * math.cos(rotation) - y * math.sin(rotation),
                                 x * math.sin(rotation) + y * math.cos(rotation)], axis=1))
    # Keep a margin for the thickest pen (20 px) on every side, shrinking a digit that slant made too wide.
    margin = 12.0
    every_point = np.concatenate(strokes)
    shrink = min(1.0, (PAD_SIZE - 2 * margin) / max(np.ptp(every_point, axis=0)))
    strokes = [stroke * shrink for stroke in strokes]
    low, high = every_point.min(axis=0) * shrink, every_point.max(axis=0) * shrink
    offset = [rng.uniform(margin - low[axis], PAD_SIZE - margin - high[axis]) for axis in range(2)]
    return [[[int(round(x + offset[0])), int(round(y + offset[1]))] for x, y in stroke] for stroke in strokes]


def make_drawings(seed=SEED, per_digit=DRAWINGS_PER_DIGIT):
    """The drawings: a list of {"digit", "template", "strokes"}, every template of a digit in turn."""
    rng = np.random.default_rng(seed)
    drawings = []
    for digit, templates in TEMPLATES.items():
        for index in range(per_digit):
            template = index % len(templates)
            drawings.append({'digit': digit, 'template': template, 'strokes': vary(templates[template], rng)})
    return drawings


def format_drawings(drawings):
    """JSON text with one drawing per line, so that a diff shows which drawings changed."""
    lines = [json.dumps(drawing, separators=(',', ':')) for drawing in drawings]
    return '{"pad_size": %d, "drawings": [\n%s\n]}\n' % (PAD_SIZE, ',\n'.join(lines))


def load_drawings(path=DRAWINGS_PATH):
    with open(path) as file:
        return json.load(file)['drawings']


def render_png(strokes, pen_width, size=PAD_SIZE, supersample=4):
    """Render strokes as dark ink on white paper with a round pen of pen_width px, antialiased; return PNG bytes."""
    from PIL import Image, ImageDraw

    scale = supersample
    image = Image.new('L', (size * scale, size * scale), 255)
    draw = ImageDraw.Draw(image)
    radius = pen_width * scale / 2.0
    for stroke in strokes:
        points = [(x * scale, y * scale) for x, y in stroke]
        if len(points) > 1:
            draw.line(points, fill=0, width=int(round(pen_width * scale)), joint='curve')
        # Round caps, and round joints where the line's own joint leaves gaps.
        for x, y in points:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=0)
    image = image.resize((size, size), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def main():
    text = format_drawings(make_drawings())
    with open(DRAWINGS_PATH, 'w') as file:
        file.write(text)
    print(f'wrote {DRAWINGS_PATH}', file=sys.stderr)


if __name__ == '__main__':
    main()
