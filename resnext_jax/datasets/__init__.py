"""TFDS builders for the datasets that TFDS does not ship: scikit-learn's digits and folders of images.

Importing this package registers the builders with TFDS (`tfds.builder("sklearn_digits")` then works).
"""

from resnext_jax.datasets.errors import DataError
from resnext_jax.datasets.image_folder import LocalImageFolder
from resnext_jax.datasets.sklearn_digits import SklearnDigits

__all__ = ["DataError", "LocalImageFolder", "SklearnDigits"]
