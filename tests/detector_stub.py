"""A stand-in for a user's NSFW detector (tests/forgetting/test_presets.py): records every call, scores each image
by its mean brightness (a number in [0, 1] that depends on the image)."""
import numpy as np

CALLS = []


def score(images):
    CALLS.append(len(images))
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0) for im in images]


def wrong_length(images):
    return [0.5]
