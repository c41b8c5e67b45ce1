"""TFDS builders for the datasets that TFDS does not ship: scikit-learn's digits and folders of images.

The builders register with TFDS when their modules are imported (`sources` does, so `tfds.builder("sklearn_digits")`
works once a pipeline has been built; importing `resnext_jax.datasets.image_folder` does it explicitly). The
package itself imports them lazily: `resnext_jax.datasets.normalization` and the device-side modules must not
load TensorFlow (the train step and the synthetic benchmark run without it).
"""

import importlib

from resnext_jax.errors import DataError

__all__ = ["DataError", "LocalImageFolder", "SklearnDigits"]

_LAZY = {"LocalImageFolder": "resnext_jax.datasets.image_folder",
         "SklearnDigits": "resnext_jax.datasets.sklearn_digits"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
