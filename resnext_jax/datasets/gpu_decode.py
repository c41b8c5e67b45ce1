"""JPEG decoding on the GPU with NVIDIA's nvImageCodec, for config.decode_on_device=True.

NOT YET RUN ON A GPU: no GPU was available where this was written. The augmentation half (device_augment.py) is
plain JAX and tested on CPU against the host path; this half (nvImageCodec -> DLPack -> JAX) is untested.

The host keeps the cheap, sequential part: tf.data reads and shuffles the records as for the host path and, from
each JPEG's header alone, computes the crop box and flip (`transforms.train_box`, same seeds, so the same boxes as
the host path). Batches of (encoded bytes, box, flip, label) come here: nvImageCodec decodes the batch on the
GPU (its hardware JPEG engines where the GPU has them, A100/H100/H200, else CUDA), the images reach JAX through
DLPack without a copy through the host, and device_augment crops, resizes, flips and normalises them.

Known costs, to measure on a GPU: each distinct image size compiles its own small XLA program the first time it
is seen (kept in memory, and across runs by the persistent compilation cache), and images are augmented one
dispatch each, then stacked.

Install with `pip install nvidia-nvimgcodec-cu12` (CUDA 12) or `nvidia-nvimgcodec-cu13` (CUDA 13).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.datasets import device_augment
from resnext_jax.datasets import normalization
from resnext_jax.errors import ConfigError

INSTALL_HINT = ("config.decode_on_device=True decodes JPEGs on the GPU with NVIDIA's nvImageCodec: "
                "pip install nvidia-nvimgcodec-cu12 (CUDA 12) or nvidia-nvimgcodec-cu13 (CUDA 13), or set "
                "config.decode_on_device=False to decode on the CPU.")


@functools.cache
def nvimgcodec():
  """The nvidia.nvimgcodec module, imported on first use; ConfigError saying what to install when it is missing."""
  try:
    from nvidia import nvimgcodec as module  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(f"{INSTALL_HINT} ({e})") from e
  return module


def check_device() -> None:
  """ConfigError unless JAX runs on a GPU (nvImageCodec's outputs are CUDA buffers)."""
  if jax.default_backend() != "gpu":
    raise ConfigError(f"config.decode_on_device=True needs a GPU; JAX's backend is {jax.default_backend()!r}. "
                      "Set config.decode_on_device=False.")


@functools.cache
def _decoder():
  codec = nvimgcodec()
  return codec.Decoder()


def _decode_params():
  codec = nvimgcodec()
  kwargs = {}
  if hasattr(codec, "ColorSpec"):
    kwargs["color_spec"] = codec.ColorSpec.RGB  # grey and CMYK JPEGs come out as 3-channel RGB
  return codec.DecodeParams(**kwargs) if hasattr(codec, "DecodeParams") else None


def decode(encoded: list[bytes]) -> list[jax.Array]:
  """Encoded images -> uint8 (H, W, 3) jax.Arrays on the current GPU (nvImageCodec's batch decode, DLPack)."""
  params = _decode_params()
  images = _decoder().decode(list(encoded), params=params) if params is not None else _decoder().decode(
      list(encoded))
  out = []
  for i, image in enumerate(images):
    if image is None:
      raise ValueError(f"nvImageCodec could not decode image {i} of the batch.")
    out.append(jax.dlpack.from_dlpack(image))
  return out


def augment_batch(encoded, boxes, flips, *, size: int, mean, std, antialias: bool = False) -> jax.Array:
  """A host batch (encoded bytes, boxes (B, 4), flips (B,)) -> normalised float32 (B, size, size, 3) on the GPU."""
  scale, offset = normalization.normalization(mean, std)
  pieces = []
  for image, box, flip in zip(decode(encoded), np.asarray(boxes), np.asarray(flips)):
    pieces.append(device_augment.crop_resize_flip(image[None], jnp.asarray(box[None]), jnp.asarray(flip[None]),
                                                  size=size, antialias=antialias)[0])
  return jnp.stack(pieces) * jnp.asarray(scale) + jnp.asarray(offset)
