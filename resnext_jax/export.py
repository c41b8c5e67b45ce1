"""Serialise the inference function of a trained or converted model for serving.

  python -m resnext_jax.export --workdir DIR --output OUT [--saved-model] [--platforms cpu,cuda]

Writes OUT/model.stablehlo (jax.export, batch dimension polymorphic, weights embedded), OUT/meta.json
(model, image shape, class names) and, with --saved-model, OUT/saved_model (TensorFlow, through jax2tf).
Both take normalised NHWC float32 images, as the eval pipeline makes them, and return logits.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import export as jax_export

from resnext_jax import checkpoint
from resnext_jax import models
from resnext_jax import runtime
from resnext_jax.errors import CheckpointError, ResNeXtError
from resnext_jax.layers.conv import PORTABLE_IMPLS  # pure XLA: the artifact runs wherever jax.export's does

STABLEHLO_FILE = "model.stablehlo"
SAVED_MODEL_DIR = "saved_model"
META_FILE = "meta.json"
DEFAULT_PLATFORMS = ("cpu", "cuda")


def _logits_fn(model):
  return lambda variables, images: model.apply(variables, images, train=False)


def export_stablehlo(model, variables, image_shape, platforms=DEFAULT_PLATFORMS):
  """A jax.export.Exported of images (b, H, W, C) -> logits (b, classes), b symbolic, weights baked in."""
  (batch,) = jax_export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  logits = _logits_fn(model)
  return jax_export.export(jax.jit(lambda x: logits(variables, x)), platforms=tuple(platforms))(images)


def load_stablehlo(path):
  """The inverse of `export_stablehlo(...).serialize()`; call `.call(images)` on the result."""
  with open(path, "rb") as f:
    return jax_export.deserialize(bytearray(f.read()))


def export_saved_model(model, variables, image_shape, path):
  """A TF SavedModel with signature `serving_default(images)`; weights stored as tf.Variables."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(tf.Variable, jax.device_get(variables))
  convert = jax2tf.convert(_logits_fn(model), polymorphic_shapes=[None, "(b, ...)"], with_gradient=False)
  module.serve = tf.function(lambda images: {"logits": convert(module.variables_tree, images)},
                             input_signature=[tf.TensorSpec((None, *image_shape), tf.float32, name="images")],
                             autograph=False)
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def write_artifacts(model, variables, image_shape, output, *, meta, saved_model=False, platforms=DEFAULT_PLATFORMS):
  """Writes model.stablehlo, meta.json and optionally saved_model/ into `output`."""
  os.makedirs(output, exist_ok=True)
  exported = export_stablehlo(model, variables, image_shape, platforms)
  with open(os.path.join(output, STABLEHLO_FILE), "wb") as f:
    f.write(exported.serialize())
  with open(os.path.join(output, META_FILE), "w") as f:
    json.dump({**meta, "image_shape": list(image_shape), "platforms": list(platforms),
               "input": "normalised NHWC float32 images, as the eval pipeline makes them",
               "output": "logits"}, f, indent=1)
  if saved_model:
    export_saved_model(model, variables, image_shape, os.path.join(output, SAVED_MODEL_DIR))


def export_workdir(workdir, output, *, step=None, image_size=None, saved_model=False, use_ema=False,
                   platforms=DEFAULT_PLATFORMS, conv_impl="xla"):
  """Loads the latest (or given) checkpoint of a training workdir or converted-weights directory and exports."""
  directory = checkpoint.checkpoint_directory(workdir)
  _, meta = checkpoint.load_meta(directory, step)
  model_name = meta["model"]
  size = image_size or meta.get("image_size") or models.native_image_size(models.create_model(model_name))
  image_shape = (size, size, 3)
  model, variables, step, meta = checkpoint.restore_variables(directory, runtime.make_mesh(), image_shape, step=step,
                                                              conv_impl=conv_impl)
  if use_ema:
    if "ema" not in variables:
      raise CheckpointError(f"checkpoint {workdir} step {step} keeps no EMA weights")
    variables = variables["ema"]
  variables = checkpoint.model_variables(variables)
  info = dict(model=model_name, num_classes=meta["num_classes"], step=step, ema=use_ema,
              class_names=meta.get("class_names"))
  write_artifacts(model, variables, image_shape, output, meta=info, saved_model=saved_model, platforms=platforms)
  return info


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="training workdir or converted-weights directory")
  parser.add_argument("--output", required=True)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--image-size", type=int, default=None, help="default: the training image size")
  parser.add_argument("--saved-model", action="store_true", help="also write a TF SavedModel (jax2tf)")
  parser.add_argument("--ema", action="store_true", help="export the EMA weights")
  parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS), help="lowering targets, e.g. cpu,cuda,tpu")
  parser.add_argument("--conv-impl", default="xla", choices=PORTABLE_IMPLS,
                      help="convolution implementation baked into the artifact (not 'kernel', a custom call "
                      "that exists only where resnext_jax compiled it, nor 'auto', which may pick it)")
  args = parser.parse_args(argv)
  try:
    info = export_workdir(args.workdir, args.output, step=args.step, image_size=args.image_size,
                          saved_model=args.saved_model, use_ema=args.ema,
                          platforms=tuple(args.platforms.split(",")), conv_impl=args.conv_impl)
  except (ResNeXtError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"exported {info['model']} step {info['step']} to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
