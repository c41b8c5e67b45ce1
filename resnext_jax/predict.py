"""--mode=predict: top-k classes of image files from a training or converted (torchvision) checkpoint.

Prints one JSON line per file, in the order given: {"file", "top_k": [{"label", "name", "prob"}, ...]}, or
{"file", "error"} for a file that is missing or not an image; the others are still predicted.
Images are preprocessed as eval does them, at config.eval_image_size when set; config.eval_checkpoint='best' takes
the best kept checkpoint (WORKDIR/checkpoints_best).
"""

import functools
import importlib.resources
import json
import math

from absl import logging
import jax
import numpy as np

from resnext_jax import checkpoint
from resnext_jax import compilation_cache
from resnext_jax import cpu
from resnext_jax import input_pipeline
from resnext_jax import runtime
from resnext_jax.errors import DataError


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
  """ImageNet-1k's class names in label order (the 1000 TFDS/torchvision indices), one a line in
  data/imagenet_classes.txt.

  TFDS only has the WordNet ids offline (n01440764, ...); these are the short English names torchvision uses
  (torchvision.models._meta._IMAGENET_CATEGORIES), shipped so prediction needs neither torch nor the data.
  """
  text = importlib.resources.files("resnext_jax").joinpath("data", "imagenet_classes.txt").read_text("utf-8")
  return tuple(text.splitlines())


def class_names(meta: dict, config) -> tuple[str, ...]:
  """Human-readable names: ImageNet's for ImageNet models, else the dataset's (stored in the checkpoint)."""
  n = int(meta["num_classes"])
  if n == len(imagenet_classes()) and meta.get("dataset", "imagenet2012") == "imagenet2012":
    return imagenet_classes()  # TFDS only knows the WordNet ids
  names = meta.get("class_names")
  if names and len(names) == n:
    return tuple(names)
  try:
    info = input_pipeline.get_dataset_info(config)
    if info.num_classes == n:
      return info.class_names
  except DataError:
    pass
  return tuple(str(i) for i in range(n))


def _load_images(files, config):
  """(list of preprocessed images or None, list of error strings or None), one entry per file."""
  images, errors = [], []
  for path in files:
    try:
      with open(path, "rb") as f:
        data = f.read()
      images.append(input_pipeline.preprocess_eval_image(data, config))
      errors.append(None)
    except (OSError, ValueError) as e:
      images.append(None)
      errors.append(f"{type(e).__name__}: {e}")
  return images, errors


def predict(config, workdir, files, *, mesh=None) -> int:
  """Prints a JSON line per file (process 0); returns the number of files that could not be predicted."""
  mesh = mesh if mesh is not None else runtime.make_mesh()
  compilation_cache.enable_from_config(config)
  cpu.prepare(config.conv_impl)  # the first-use kernel build overlaps what follows
  image_shape = (config.image_size, config.image_size, 3)
  model, variables, step, meta = checkpoint.load_evaluated(config, workdir, mesh, image_shape)
  names = class_names(meta, config)
  images, errors = _load_images(files, input_pipeline.eval_config(config))  # at config.eval_image_size when set
  probs = _probabilities(model, checkpoint.model_variables(variables),
                         [im for im in images if im is not None], config, mesh)
  k = min(config.top_k, int(meta["num_classes"]))
  it = iter(probs)
  for path, image, error in zip(files, images, errors):
    if image is None:
      line = {"file": path, "error": error}
    else:
      p = next(it)
      top = np.argsort(-p, kind="stable")[:k]
      line = {"file": path, "top_k": [{"label": int(i), "name": names[i], "prob": float(p[i])} for i in top]}
    if jax.process_index() == 0:
      print(json.dumps(line), flush=True)
  failed = sum(e is not None for e in errors)
  logging.info("Predicted %d files with checkpoint step %d; %d failed.", len(files) - failed, step, failed)
  return failed


def _probabilities(model, variables, images, config, mesh) -> np.ndarray:
  """Softmax outputs for a list of (H, W, 3) images, in batches padded to a multiple of the device count."""
  if not images:
    return np.zeros((0, 0), np.float32)
  devices = mesh.devices.size
  batch = max(devices, config.eval_batch_size // devices * devices)
  fn = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)), out_shardings=runtime.replicated(mesh),
               compiler_options=cpu.compiler_options())  # as the eval step
  stacked, out = np.stack(images).astype(np.float32), []
  for start in range(0, len(stacked), batch):
    chunk = stacked[start:start + batch]
    padded_len = math.ceil(len(chunk) / devices) * devices
    chunk = np.concatenate([chunk, np.zeros((padded_len - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    out.append(runtime.to_host(fn(variables, runtime.from_host(chunk, mesh)))[:len(stacked[start:start + batch])])
  return np.concatenate(out)
