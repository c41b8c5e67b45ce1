"""The one exception type for data problems that the user, not the code, has to fix."""


class DataError(Exception):
  """A user-facing data problem (missing or unknown dataset, bad split, indivisible batch...).

  The message says what to do; the training loop prints it without a traceback.
  """
