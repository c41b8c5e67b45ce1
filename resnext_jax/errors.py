"""Every error a user can cause or fix (bad config, data, checkpoint, machine): one base class, so that
main.py prints one line for any of them instead of a traceback. Programming errors stay plain exceptions.

Each keeps the builtin base it had before (ValueError, RuntimeError), so code that caught those still does.
"""


class ResNeXtError(Exception):
  """Base class of the errors that main.py reports as one line ("error: ...")."""


class ConfigError(ResNeXtError, ValueError):
  """An inconsistent or invalid config value; the message names the field."""


class DataError(ResNeXtError):
  """A data problem the user has to fix (missing or unknown dataset, bad split, undecodable file...).

  The message says what to do.
  """


class CheckpointError(ResNeXtError):
  """A checkpoint directory that is missing, empty or unreadable; the message names the path."""


class ConversionError(ResNeXtError, ValueError):
  """A torchvision state dict that does not fit the model; the message names the tensor."""


class TrainingError(ResNeXtError, RuntimeError):
  """Training cannot go on (non-finite loss); the message names the step and the last good checkpoint."""


class KernelUnavailable(ResNeXtError, RuntimeError):
  """Our CPU kernels could not be built or loaded here (the message says why)."""
