"""Read, decode and resize item images (PIL; no Ray, no torch).

Every image becomes RGB uint8 [S, S, 3]: short side resized to S (bicubic), then centre-cropped,
which is CLIP's and ImageNet's evaluation transform. Failures do not raise: each image gets a
status, and the feature store gives failed items the mean image feature.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

OK, MISSING, CORRUPT = "ok", "missing", "corrupt"


def is_file(path: str) -> bool:
    """Whether `path` names a regular file; False for '' and for paths no file system accepts
    (a name too long, a NUL character), on which Path.is_file may raise."""
    try:
        return bool(path) and Path(path).is_file()
    except (OSError, ValueError):
        return False


def load_image(path: str, size: int) -> tuple[np.ndarray | None, str]:
    """(uint8 [S, S, 3] or None, status): MISSING for '' or no such file, CORRUPT when the file
    cannot be decoded (truncated, not an image, ...)."""
    if not is_file(path):
        return None, MISSING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd metadata; decodable is what counts
            with Image.open(path) as image:
                image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it can
                image = image.convert("RGB")
                fitted = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
                return np.asarray(fitted, dtype=np.uint8), OK
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, CORRUPT


def decode_images(paths, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[B] paths -> (uint8 [B, S, S, 3] with zeros where decoding failed, [B] status strings)."""
    pixels = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    status = np.empty(len(paths), dtype=object)
    for row, path in enumerate(paths):
        image, status[row] = load_image(str(path), size)
        if image is not None:
            pixels[row] = image
    return pixels, status.astype(str)
