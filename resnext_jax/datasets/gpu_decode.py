"""JPEG decoding on the GPU with NVIDIA's nvImageCodec, for config.decode_on_device=True.

NOT YET RUN ON A GPU: no GPU was available where this was written. The augmentation half (device_augment.py) is
plain JAX and tested on CPU against the host path. This half runs in the tests with nvImageCodec's CPU backend
($RESNEXT_JAX_DECODE_BACKEND=cpu: its libjpeg-turbo, host buffers, no CUDA needed), through the whole input
pipeline; its GPU backends (nvJPEG, the hardware JPEG engines) and DLPack from device buffers have not run.

The host keeps the cheap, sequential part: tf.data reads and shuffles the records as for the host path and, from
each JPEG's header alone, computes the crop box and flip (`transforms.train_box`, same seeds, so the same boxes as
the host path). Batches of (encoded bytes, box, flip, label) come here: nvImageCodec decodes the batch on the
GPU (its hardware JPEG engines where the GPU has them, A100/H100/H200, else CUDA), the images reach JAX through
DLPack without a copy through the host, and device_augment crops, resizes, flips and normalises them. Each
device decodes its own slice of the batch (input_pipeline._device_decoded_batches), with a decoder of its own.

Known costs, to measure on a GPU: each image is one small dispatch (device_augment.window), and each distinct
image size compiles that small program once in each process: no dot, so no autotuning; 0.05 s on a 2-core Zen
4's CPU backend (0.01 s tracing, 0.04 s XLA). A train set with thousands of distinct sizes, as ImageNet's, pays
minutes of such compiles in its first epoch; they are under the persistent cache's 0.5 s threshold, so a resumed
run pays them again unless config.compilation_cache_min_compile_secs is 0. The batch's resize is one program. A
fixed decode shape would remove the per-size programs, but nvImageCodec 0.9 neither decodes into a caller's
buffer (it reuses only buffers it allocated) nor pads a region that reaches past the image (its CPU decoders
reject such regions), and its GPU region decode has a reported 0.9 regression (INTERNAL_ERROR on A100, SIGSEGV
on H100: NVIDIA/nvImageCodec#55): so whole images are decoded here, and only the window is kept.

Install with `pip install 'nvidia-nvimgcodec-cu12[nvjpeg]'` (CUDA 12) or `'nvidia-nvimgcodec-cu13[nvjpeg]'`
(CUDA 13): without nvJPEG (the extra, or a CUDA toolkit) nvImageCodec registers no GPU JPEG decoder. The decoder
is limited to the GPU backends, so a missing nvJPEG is an error, not a silent decode on the CPU.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.datasets import device_augment
from resnext_jax.datasets import normalization
from resnext_jax.errors import ConfigError, DataError

INSTALL_HINT = ("config.decode_on_device=True decodes JPEGs on the GPU with NVIDIA's nvImageCodec and nvJPEG: "
                "pip install 'nvidia-nvimgcodec-cu12[nvjpeg]' (CUDA 12) or 'nvidia-nvimgcodec-cu13[nvjpeg]' "
                "(CUDA 13), or set config.decode_on_device=False to decode on the CPU.")
BACKENDS = ("gpu", "cpu")


@functools.cache
def nvimgcodec():
  """The nvidia.nvimgcodec module, imported on first use; ConfigError saying what to install when it is missing."""
  try:
    from nvidia import nvimgcodec as module  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(f"{INSTALL_HINT} ({e})") from e
  return module


def backend() -> str:
  """$RESNEXT_JAX_DECODE_BACKEND: 'gpu' (default), or 'cpu' for nvImageCodec's CPU backend, which runs this path
  on a machine without a GPU (to check it; it is slower than the host path)."""
  name = os.environ.get("RESNEXT_JAX_DECODE_BACKEND", "gpu").lower()
  if name not in BACKENDS:
    raise ConfigError(f"RESNEXT_JAX_DECODE_BACKEND={name!r}; expected one of {BACKENDS}.")
  return name


def check_device() -> None:
  """ConfigError unless JAX runs on a GPU (nvImageCodec's outputs are CUDA buffers), or the CPU backend is chosen."""
  if backend() == "gpu" and jax.default_backend() != "gpu":
    raise ConfigError(f"config.decode_on_device=True needs a GPU; JAX's backend is {jax.default_backend()!r}. "
                      "Set config.decode_on_device=False.")


@functools.cache
def _decoder(name: str, device_id: int):
  """One decoder per device: input_pipeline decodes each device's slice in a thread of its own, and a decoder is
  not safe to share between threads (the CPU backend's failed when four threads shared it)."""
  codec = nvimgcodec()
  if name == "cpu":
    return codec.Decoder(device_id=codec.NVIMGCODEC_DEVICE_CPU_ONLY,
                         backends=[codec.Backend(codec.BackendKind.CPU_ONLY)])
  kinds = (codec.BackendKind.HW_GPU_ONLY, codec.BackendKind.GPU_ONLY, codec.BackendKind.HYBRID_CPU_GPU)
  return codec.Decoder(device_id=device_id, backends=[codec.Backend(kind) for kind in kinds])


@functools.cache
def _decode_params():
  """Interleaved RGB (grey and CMYK JPEGs too), EXIF orientation ignored: the host path (TF's decoder) ignores it,
  and the crop boxes come from the stored size."""
  codec = nvimgcodec()
  return codec.DecodeParams(apply_exif_orientation=False, color_spec=codec.ColorSpec.SRGB,
                            sample_format=codec.SampleFormat.I_RGB)


def decode(encoded: list[bytes], device: jax.Device | None = None) -> list[jax.Array]:
  """Encoded images -> uint8 (H, W, 3) jax.Arrays on `device` (default: the first local one): decoded on that GPU
  and handed over through DLPack (nvImageCodec's batch decode), or, with the CPU backend, copied from its host
  buffers (by jax.device_put: jnp.asarray compiled a program per image shape, 11 ms each, which made a first pass
  over 168 sizes 10x slower than the next)."""
  name, device = backend(), device or jax.local_devices()[0]
  device_id = device.local_hardware_id if name == "gpu" else device.id  # the CPU backend's key: one per thread
  images = _decoder(name, device_id).decode(list(encoded), params=_decode_params())
  out = []
  for i, image in enumerate(images):
    if image is None:
      raise DataError(f"nvImageCodec ({name} backend) could not decode image {i} of the batch: not an image it "
                      f"reads, or no GPU JPEG decoder (nvJPEG) installed. {INSTALL_HINT}")
    out.append(jax.device_put(np.asarray(image.cpu()), device) if name == "cpu" else jax.dlpack.from_dlpack(image))
  return out


def augment_batch(encoded, boxes, flips, *, size: int, mean, std, antialias: bool = False,
                  device: jax.Device | None = None) -> jax.Array:
  """A host batch (encoded bytes, boxes (B, 4), flips (B,)) -> normalised float32 (B, size, size, 3), decoded and
  augmented on `device` (default: the first local one)."""
  scale, offset = normalization.normalization(mean, std)
  pixels = device_augment.crop_resize_flip(decode(encoded, device), boxes, flips, size=size, antialias=antialias)
  return pixels * jnp.asarray(scale) + jnp.asarray(offset)
