"""Every error a user can cause or fix (bad config, data, checkpoint, machine): one base class, so that
main.py prints one line for any of them instead of a traceback. Programming errors stay plain exceptions."""


class ResNeXtError(Exception):
  """Base class of the errors that main.py reports as one line ("error: ...")."""


class KernelUnavailable(ResNeXtError, RuntimeError):
  """Our CPU kernels could not be built or loaded here (the message says why)."""
