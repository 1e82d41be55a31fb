"""Shifted handwriting, made from MNIST test digits, to show and measure the drift monitor (no downloads).

Each shift turns 28x28 uint8 digits (white on black, as MNIST) into digits of another kind, as a served model would
meet them when asked by another population or device:

    rotated      turned by 25 to 45 degrees either way (a form scanned askew, a phone held sideways)
    slanted      sheared by 0.4 to 0.7 px per row, as italic handwriting
    scanned      another collection: scanned paper, a gray background, faint ink, noise and a soft scanner blur
    thick        a broad pen, and the digit filling the whole 28 px frame (EMNIST's framing) instead of MNIST's 20 px
    inverted     dark ink on white paper, sent as pixels without inverting them
    off-centre   moved 5 to 7 px away from the centre (a crop that missed)

Example:
    shifted = apply_shift('rotated', x_test[:500], seed=0)
"""

import numpy as np

SHIFTS = ('rotated', 'slanted', 'scanned', 'thick', 'inverted', 'off-centre')


def rotated(images, rng):
    from scipy import ndimage

    angles = rng.uniform(25, 45, len(images)) * rng.choice([-1, 1], len(images))
    return np.stack([ndimage.rotate(image, angle, reshape=False, order=1) for image, angle in zip(images, angles)])


def slanted(images, rng):
    from scipy import ndimage

    shears = rng.uniform(0.4, 0.7, len(images)) * rng.choice([-1, 1], len(images))
    # Output (row, column) reads input (row, column + shear * (row - 14)): the top leans one way, the bottom the
    # other, about the centre row.
    return np.stack([ndimage.affine_transform(image, [[1, 0], [shear, 1]], offset=[0, -14 * shear], order=1)
                     for image, shear in zip(images, shears)])


def scanned(images, rng):
    from scipy import ndimage

    contrast = rng.uniform(0.45, 0.65, (len(images), 1, 1))
    background = rng.uniform(30, 60, (len(images), 1, 1))
    soft = ndimage.gaussian_filter(images, sigma=(0, 0.8, 0.8))
    noisy = background + contrast * soft + rng.normal(0, 18, images.shape)
    return noisy


def thick(images, rng):
    from scipy import ndimage

    broad = ndimage.grey_dilation(images, size=(1, 3, 3))
    # MNIST fits digits in a 20 px box; this collection fills 26 of the 28 px.
    fitted = [ndimage.zoom(image[4:24, 4:24], 1.3, order=1) for image in broad]
    return np.stack([np.pad(image, [(1, 28 - 1 - image.shape[0]), (1, 28 - 1 - image.shape[1])])[:28, :28]
                     for image in fitted])


def inverted(images, rng):
    return 255.0 - images


def off_centre(images, rng):
    from scipy import ndimage

    shifts = rng.integers(5, 8, (len(images), 2)) * rng.choice([-1, 1], (len(images), 2))
    # Moved within the frame, not wrapped around it: what leaves the frame is cut off, as by a crop that missed.
    return np.stack([ndimage.shift(image, shift, order=0) for image, shift in zip(images, shifts)])


MAKERS = {'rotated': rotated, 'slanted': slanted, 'scanned': scanned, 'thick': thick, 'inverted': inverted,
          'off-centre': off_centre}


def apply_shift(name, images, seed=0):
    """The digits (n x 28 x 28 or n x 784, 0-255) with shift `name` applied, as n x 28 x 28 uint8."""
    if name not in MAKERS:
        raise ValueError(f'unknown shift {name!r}: choose one of {", ".join(SHIFTS)}')
    images = np.asarray(images, dtype=np.float64).reshape(-1, 28, 28)
    shifted = MAKERS[name](images, np.random.default_rng(seed))
    return np.clip(np.round(shifted), 0, 255).astype(np.uint8)


def png_bytes(image):
    """One 28x28 uint8 digit as PNG bytes (what a client of predict_image sends)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8).reshape(28, 28), mode='L').save(buffer, format='PNG')
    return buffer.getvalue()
