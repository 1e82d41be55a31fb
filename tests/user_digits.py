"""MNIST test digits re-drawn as a user would photograph or draw them, to check the predict_image signature.

Each digit becomes dark ink on light (slightly uneven) paper, is scaled up 2-8 times with margins on every side,
and is saved as gray, RGB or RGBA PNG, or as JPEG.
"""
import io

import numpy as np
from PIL import Image


def redraw_digit(pixels, rng):
    """Return (image bytes, format) for one 28x28 uint8 MNIST digit (white on black)."""
    scale = int(rng.integers(2, 9))
    ink = Image.fromarray(pixels).resize((28 * scale, 28 * scale), Image.BICUBIC)
    paper_level = int(rng.integers(190, 256))
    ink_level = int(rng.integers(0, 60))
    ink_share = np.asarray(ink, dtype=np.float32) / 255.0
    drawn = paper_level * (1.0 - ink_share) + ink_level * ink_share
    # Margins of up to one digit's width on each side, so the digit is off-centre and small in the picture.
    top, bottom, left, right = (int(rng.integers(0, 28 * scale)) for _ in range(4))
    drawn = np.pad(drawn, ((top, bottom), (left, right)), constant_values=paper_level)
    drawn = np.clip(drawn + rng.normal(0.0, 3.0, drawn.shape), 0, 255).astype(np.uint8)
    kind = ['L', 'RGB', 'RGBA', 'JPEG'][int(rng.integers(0, 4))]
    image = Image.fromarray(drawn)
    buffer = io.BytesIO()
    if kind == 'JPEG':
        image.convert('RGB').save(buffer, format='JPEG', quality=90)
    else:
        image.convert(kind).save(buffer, format='PNG')
    return buffer.getvalue(), kind


def redraw_digits(images, seed=0):
    """Re-draw a batch of digits; returns a list of image bytes and a list of their kinds."""
    rng = np.random.default_rng(seed)
    drawn = [redraw_digit(image, rng) for image in images]
    return [content for content, _ in drawn], [kind for _, kind in drawn]
