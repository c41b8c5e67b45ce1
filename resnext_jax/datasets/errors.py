"""DataError, the one exception type for data problems the user has to fix, lives in resnext_jax/errors.py with
the other user-facing errors; it is importable from here too, for the builders in this package."""

from resnext_jax.errors import DataError  # pylint: disable=unused-import
