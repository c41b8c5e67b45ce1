"""TFDS builders for the datasets that TFDS does not ship: scikit-learn's digits and folders of images.

Importing this package registers the builders with TFDS (`tfds.builder("sklearn_digits")` then works).
"""

from resnext_jax.datasets.image_folder import LocalImageFolder
from resnext_jax.datasets.sklearn_digits import SklearnDigits
from resnext_jax.errors import DataError

__all__ = ["DataError", "LocalImageFolder", "SklearnDigits"]
