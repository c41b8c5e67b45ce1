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

Fixed shapes for any image size. XLA compiles a program per input shape, and a train set has thousands of image
sizes. nvImageCodec 0.9 decodes only into buffers it allocated, but it reuses a decoded image's buffer for the
next image it is handed, keeping its capacity. So each image is decoded into a pooled buffer of one of
BUFFER_BYTES' five sizes, and JAX reads the buffer's first bytes, through DLPack and without a copy, as an array
of that size's one shape (`decode`); device_augment.window gathers the image from it, given its height, width
and row pitch. A buffer returns to its pool when JAX releases the view, which is after the last program that
reads it has run (on a GPU that rests on how PJRT releases DLPack views: gpu_decode_benchmark --model checks
it). The window programs then compile per buffer size and DCT scale, about ten in all, not once per
image size (a first pass over 168 sizes on the CPU backend: 148 images/s, against 29-30 when each size compiled
its own). Fixed decode shapes by other means are not on offer in 0.9: its CPU decoders reject regions that
reach past the image, and its GPU region decode has a reported 0.9 regression (INTERNAL_ERROR on A100, SIGSEGV on
H100: NVIDIA/nvImageCodec#55).

Known costs, to measure on a GPU: each image is one small dispatch (device_augment.window), about 10 µs of
host time here, and one jax.dlpack.from_dlpack, 45-60 µs of JAX's Python (so a host with several GPUs should run
a process per GPU: docs/input_pipeline.md); the pooled buffers hold 1 MiB per image of ImageNet's usual size in
flight (16 MiB for the largest); the views reach JAX through nvImageCodec's `as_image` and DLPack, which has run
on the CPU backend only (there through NumPy's DLPack).

Install with `pip install 'nvidia-nvimgcodec-cu12[nvjpeg]'` (CUDA 12) or `'nvidia-nvimgcodec-cu13[nvjpeg]'`
(CUDA 13): without nvJPEG (the extra, or a CUDA toolkit) nvImageCodec registers no GPU JPEG decoder. The decoder
is limited to the GPU backends, so a missing nvJPEG is an error, not a silent decode on the CPU.
"""

import collections
import functools
import io
import os
import weakref

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


def pooled() -> bool:
  """$RESNEXT_JAX_DECODE_POOL: '1' (default) decodes into pooled buffers of fixed sizes (`decode`); '0' gives each
  image a buffer of its own and JAX the image's own shape, so a window program per image size: the path to fall
  back to should the pooled views fail on a GPU stack (they have not run on one; benchmarks/gpu_check.sh does)."""
  value = os.environ.get("RESNEXT_JAX_DECODE_POOL", "1")
  if value not in ("0", "1"):
    raise ConfigError(f"RESNEXT_JAX_DECODE_POOL={value!r}; expected '1' (pooled buffers) or '0' (one per image).")
  return value == "1"


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


# Decoded images land in reused buffers of these sizes (bytes; the smallest that holds the image), which JAX sees
# as arrays of one fixed shape each: 1 MiB holds a 500 x 500 RGB image (most of ImageNet), 16 MiB one of about
# 2,360 x 2,360. Larger images get a buffer of their own, and a window program of their own size.
BUFFER_BYTES = tuple(1 << bits for bits in range(20, 25))
_VIEW_COLUMNS = 4096


class _View:
  """The first `nbytes` of a decoded image's buffer as a fixed-shape uint8 array (nbytes / 4096, 4096), through the
  CUDA (GPU) or NumPy (CPU backend) array interface: what JAX imports, without a copy, instead of the image's own
  shape. Holds the image (and so its buffer) while JAX holds the view."""

  def __init__(self, image, shape, interface: str):
    self.image = image
    data = getattr(image, interface)["data"][0]
    setattr(self, interface, {"shape": shape, "typestr": "|u1", "data": (data, False), "version": 3,
                              "strides": None})


@functools.cache
def _free_buffers(name: str, device_id: int) -> dict:
  """{buffer size: decoded images whose buffers JAX has released}, one pool per decoder."""
  return {nbytes: collections.deque() for nbytes in BUFFER_BYTES}


@functools.cache
def _blank_jpeg(nbytes: int) -> bytes:
  """A grey JPEG of at least nbytes of RGB pixels: decoding it allocates a buffer that size (cheap to decode)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = io.BytesIO()
  Image.new("RGB", (1024, -(-nbytes // 3072)), (128, 128, 128)).save(out, format="JPEG", quality=50)
  return out.getvalue()


def _buffer_size(height: int, width: int) -> int | None:
  return next((nbytes for nbytes in BUFFER_BYTES if height * width * 3 <= nbytes), None)


def _code_streams(encoded) -> tuple[list, list]:
  """(nvImageCodec's code streams, (height, width) from each header)."""
  codec = nvimgcodec()
  streams, shapes = [], []
  for i, data in enumerate(encoded):
    try:
      stream = codec.CodeStream(bytes(data))
      shapes.append((stream.height, stream.width))
    except RuntimeError as e:
      raise DataError(f"nvImageCodec could not read image {i} of the batch: not an image it reads ({e}).") from e
    streams.append(stream)
  return streams, shapes


def _decode_into(decoder, streams, targets, params):
  """Decodes streams[i] into targets[i] (a pooled image whose buffer is reused, or None: a buffer of its own)."""
  reused = [i for i, target in enumerate(targets) if target is not None]
  own = [i for i, target in enumerate(targets) if target is None]
  images = [None] * len(streams)
  if reused:
    for i, image in zip(reused, decoder.decode([streams[i] for i in reused], images=[targets[i] for i in reused],
                                               params=params)):
      images[i] = image
  if own:
    for i, image in zip(own, decoder.decode([streams[i] for i in own], params=params)):
      images[i] = image
  return images


def _take_buffers(pool, decoder, sizes) -> list:
  """A released image from the pool for each size (None where there is no size: a large image), decoding a blank
  JPEG to make a buffer where the pool has none free."""
  targets = [pool[nbytes].pop() if nbytes and pool[nbytes] else None for nbytes in sizes]
  missing = [i for i, (nbytes, target) in enumerate(zip(sizes, targets)) if nbytes and target is None]
  if missing:
    blanks, _ = _code_streams([_blank_jpeg(sizes[i]) for i in missing])
    for i, image in zip(missing, decoder.decode(blanks, params=_decode_params())):
      targets[i] = image
  return targets


def _import(image, nbytes, name, device, release) -> jax.Array:
  """The first nbytes of image's buffer (or its whole rows where nbytes is None) as a JAX array on `device`, without
  a copy; release() runs once JAX no longer reads it (the DLPack view's owner is dropped after the last use)."""
  height, pitch = image.height, image.strides[0]
  shape = (nbytes // _VIEW_COLUMNS, _VIEW_COLUMNS) if nbytes else (height, pitch)
  view = _View(image, shape, "__array_interface__" if name == "cpu" else "__cuda_array_interface__")
  if release is not None:
    weakref.finalize(view, release)
  if name == "cpu":  # NumPy's DLPack; from_dlpack keeps it, and so the view, until the array is freed
    array = jax.dlpack.from_dlpack(np.asarray(view))  # on the first CPU device; device_put there would copy
    return array if array.devices() == {device} else jax.device_put(array, device)
  codec = nvimgcodec()
  return jax.dlpack.from_dlpack(codec.as_image(view, cuda_stream=image.cuda_stream,
                                               sample_format=codec.SampleFormat.I_Y))


def _own_array(image, name, device) -> jax.Array:
  """An image in a buffer of its own as a (H, W, 3) array on `device`: DLPack from the GPU, or, with the CPU
  backend, a copy by jax.device_put (jnp.asarray compiled a program per image shape)."""
  if name == "cpu":
    return jax.device_put(np.asarray(image.cpu()), device)
  return jax.dlpack.from_dlpack(image)


def decode(encoded: list[bytes], device: jax.Device | None = None) -> list[device_augment.Decoded]:
  """Encoded images -> device_augment.Decoded images on `device` (default: the first local one), decoded on that
  GPU (nvImageCodec's batch decode) or, with the CPU backend, on the host.

  Each image is decoded into a reused buffer of one of BUFFER_BYTES' sizes (the smallest that holds it), and JAX
  reads that buffer, through DLPack and without a copy, as an array of that size's fixed shape: so that the window
  programs compile once per buffer size rather than once per image size (a first pass over ImageNet's many sizes
  would otherwise spend most of its time compiling). A buffer returns to its pool when JAX has released it.
  With $RESNEXT_JAX_DECODE_POOL=0, each image gets a buffer, and JAX an array, of its own (`pooled`)."""
  name, device = backend(), device or jax.local_devices()[0]
  device_id = device.local_hardware_id if name == "gpu" else device.id  # the CPU backend's key: one per thread
  decoder, pool = _decoder(name, device_id), _free_buffers(name, device_id)
  streams, shapes = _code_streams(encoded)
  use_pool = pooled()
  sizes = [_buffer_size(*shape) if use_pool else None for shape in shapes]
  images = _decode_into(decoder, streams, _take_buffers(pool, decoder, sizes), _decode_params())
  out = []
  for i, (image, nbytes) in enumerate(zip(images, sizes)):
    if image is None:
      raise DataError(f"nvImageCodec ({name} backend) could not decode image {i} of the batch: not an image it "
                      f"reads, or no GPU JPEG decoder (nvJPEG) installed. {INSTALL_HINT}")
    if not use_pool:
      out.append(device_augment.Decoded.of(_own_array(image, name, device)))
      continue
    height, width, pitch = image.height, image.width, image.strides[0]
    release = functools.partial(pool[nbytes].append, image) if nbytes else None
    if nbytes and ((height - 1) * pitch + width * 3 > nbytes or image.capacity < nbytes):
      nbytes = None  # rows padded past the size, or a buffer reallocated smaller: the image's own rows
    buffer = _import(image, nbytes, name, device, release)
    out.append(device_augment.Decoded(buffer, height, width, pitch))
  return out


def augment_batch(encoded, boxes, flips, *, size: int, mean, std, antialias: bool = False, crops=None,
                  device: jax.Device | None = None) -> jax.Array:
  """A host batch (encoded bytes, boxes (B, 4), flips (B,)[, crops (B, 4)]) -> normalised float32
  (B, size, size, 3), decoded and augmented on `device` (default: the first local one); see
  device_augment.crop_resize_flip."""
  scale, offset = normalization.normalization(mean, std)
  pixels = device_augment.crop_resize_flip(decode(encoded, device), boxes, flips, size=size, antialias=antialias,
                                           crops=crops)
  return pixels * jnp.asarray(scale) + jnp.asarray(offset)
