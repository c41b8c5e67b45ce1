"""Evaluation: the jitted eval step, the masked eval loop, and `--mode=eval` on a saved checkpoint.

Every eval example counts exactly once: the input pipeline pads the last batches and carries a mask, and the
step returns per-example results gathered to every process, so sums are taken on the host over exactly the
masked-in examples. Counts are therefore identical on any number of devices and processes; losses are added
with math.fsum (exactly rounded, independent of order), so they differ only where XLA rounds a logit
differently for a different per-device batch (~1e-9 relative).
"""

import functools
import json
import math
import os
from typing import Any

from absl import logging
from clu import metric_writers
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from resnext_jax import checkpoint
from resnext_jax import cpu
from resnext_jax import input_pipeline
from resnext_jax import models
from resnext_jax.optim import ConfigError, cross_entropy

# Fields of the ResNeXt module that change the parameter tree; stored in the checkpoint's meta so that eval and
# predict rebuild the same architecture whatever config they are given.
_ARCH_META = "model_overrides"


def make_mesh(devices=None) -> Mesh:
  """One 'data' axis over all devices of all processes (pure data parallelism; params replicated)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree):
  """Replicated (or host) arrays -> numpy, on every process (a replicated global array is whole on each)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


def model_overrides(config) -> dict:
  """Architecture fields from the config that are not the registry's (tuples, not JSON lists)."""
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model_overrides.items()}
  overrides.setdefault("block_form", config.block_form)
  overrides.setdefault("zero_init_last_bn", config.zero_init_last_bn)
  return overrides


def build_model(config, num_classes: int, *, name=None, overrides=None):
  """The model for `config` (or for a checkpoint's name and overrides), compute dtype from half_precision."""
  overrides = dict(model_overrides(config) if overrides is None else overrides)
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  try:
    return models.create_model(name or config.model, num_classes=num_classes, dtype=dtype,
                               conv_impl=config.conv_impl, frozen_stages=config.get("frozen_stages", 0),
                               **overrides)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def abstract_variables(model, image_shape, mesh) -> dict:
  """{'params', 'batch_stats'} as ShapeDtypeStructs with replicated shardings: Orbax's restore target."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  sharding = replicated(mesh)
  return {k: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes[k])
          for k in ("params", "batch_stats")}


def inference_checkpoint(config, workdir) -> str:
  """The workdir's checkpoints if it has any, else config.init_checkpoint (e.g. converted torchvision weights)."""
  directory = checkpoint.checkpoint_directory(workdir)
  if checkpoint.has_checkpoint(directory) or not config.init_checkpoint:
    return directory
  return checkpoint.checkpoint_directory(config.init_checkpoint)


def load_variables(config, workdir, mesh, image_shape, step=None):
  """Restores a training or converted checkpoint for inference.

  Returns (model, {'params', 'batch_stats'[, 'ema']}, step, meta); the architecture and class count come from
  the checkpoint's meta, so any config (e.g. the one that trained it) evaluates it.
  """
  directory = inference_checkpoint(config, workdir)
  step, meta = checkpoint.load_meta(directory, step)
  model = build_model(config, int(meta["num_classes"]), name=meta["model"], overrides=meta.get(_ARCH_META, {}))
  target = abstract_variables(model, image_shape, mesh)
  if meta.get("ema"):
    target.update(ema_params=target["params"], ema_batch_stats=target["batch_stats"])
  restored = checkpoint.restore(directory, model_target=target, step=step)
  variables = restored["model"]
  out = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if meta.get("ema"):
    out["ema"] = {"params": variables["ema_params"], "batch_stats": variables["ema_batch_stats"]}
  logging.info("Loaded %s (step %d, model %s, %d classes).", directory, step, meta["model"], meta["num_classes"])
  return model, out, step, meta


def eval_step(variables, batch, *, model) -> dict:
  """Per-example loss, top-1 and top-5 hits and mask for one (padded) batch."""
  logits = model.apply(variables, batch["image"], train=False)
  labels = batch["label"]
  top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return {"loss": cross_entropy(logits, labels, logits.shape[-1]),
          "top1": top[:, 0] == labels,
          "top5": jnp.any(top == labels[:, None], axis=-1),
          "mask": batch["mask"].astype(bool)}


def compile_eval_step(model, mesh):
  """eval_step jitted over the mesh; outputs replicated so every process sees every example's result."""
  return jax.jit(functools.partial(eval_step, model=model),
                 in_shardings=(replicated(mesh), NamedSharding(mesh, P("data"))),
                 out_shardings=replicated(mesh), compiler_options=cpu.compiler_options())


def run_evaluation(p_eval_step, variables, batches) -> dict:
  """{'top1', 'top5', 'loss', 'num_examples'} over the masked-in examples of `batches`."""
  losses, top1, top5, count = [], 0, 0, 0

  def consume(out):
    nonlocal top1, top5, count
    out = to_host(out)
    m = out["mask"]
    losses.extend(out["loss"][m].astype(np.float64).tolist())
    top1 += int(out["top1"][m].sum())
    top5 += int(out["top5"][m].sum())
    count += int(m.sum())

  pending = None
  for batch in batches:
    out = p_eval_step(variables, batch)  # dispatch the next batch before reading the previous one
    if pending is not None:
      consume(pending)
    pending = out
  if pending is not None:
    consume(pending)
  if count == 0:
    raise input_pipeline.DataError("the eval split produced no examples")
  return {"top1": top1 / count, "top5": top5 / count, "loss": math.fsum(losses) / count, "num_examples": count}


def evaluate_all(p_eval_step, variables, config, mesh) -> dict:
  """Evaluates the weights, and the EMA weights (keys prefixed 'ema_') when present."""
  plain = {k: variables[k] for k in ("params", "batch_stats")}
  result = run_evaluation(p_eval_step, plain, input_pipeline.create_eval_iterator(config, mesh))
  if variables.get("ema") is not None:
    ema = run_evaluation(p_eval_step, variables["ema"], input_pipeline.create_eval_iterator(config, mesh))
    result.update({f"ema_{k}": v for k, v in ema.items() if k != "num_examples"})
  return result


def write_eval_metrics(writer, step: int, result: dict) -> None:
  writer.write_scalars(step, {f"eval_{k}": v for k, v in result.items() if k != "num_examples"})
  writer.flush()


def result_line(step: int, result: dict) -> str:
  """The JSON object printed as the last line of stdout by train and eval."""
  return json.dumps({"step": int(step), **result}, sort_keys=False)


def evaluate(config, workdir, *, mesh=None) -> dict[str, Any]:
  """--mode=eval: the latest (or config.eval_checkpoint_step) checkpoint on the full eval split, once."""
  mesh = mesh if mesh is not None else make_mesh()
  check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
  info = input_pipeline.get_dataset_info(config)
  step = config.eval_checkpoint_step if config.eval_checkpoint_step >= 0 else None
  model, variables, step, meta = load_variables(config, workdir, mesh, info.image_shape, step)
  if int(meta["num_classes"]) != info.num_classes:
    raise ConfigError(f"checkpoint has {meta['num_classes']} classes but dataset {config.dataset!r} has "
                      f"{info.num_classes}")
  result = evaluate_all(compile_eval_step(model, mesh), variables, config, mesh)
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                collection="eval")
  write_eval_metrics(writer, step, result)
  writer.close()
  print(result_line(step, result), flush=True)
  return {"step": step, **result}


def check_batch_size(name: str, batch_size: int, mesh, multiple_of: int = 1) -> None:
  """Batches are split evenly over devices (and micro-batches): say so instead of failing inside XLA."""
  devices = mesh.devices.size
  if batch_size <= 0 or batch_size % (devices * multiple_of):
    extra = f" x grad_accum_steps ({multiple_of})" if multiple_of > 1 else ""
    raise ConfigError(f"config.{name}={batch_size} must be divisible by the number of devices ({devices})"
                      f"{extra}")
