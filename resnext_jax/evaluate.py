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
import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax import checkpoint
from resnext_jax import cpu
from resnext_jax import input_pipeline
from resnext_jax import runtime
from resnext_jax.errors import ConfigError, DataError
from resnext_jax.optim import cross_entropy


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
                 in_shardings=(runtime.replicated(mesh), runtime.batch_sharded(mesh)),
                 out_shardings=runtime.replicated(mesh), compiler_options=cpu.compiler_options())


def run_evaluation(p_eval_step, variables, batches) -> dict:
  """{'top1', 'top5', 'loss', 'num_examples'} over the masked-in examples of `batches`."""
  losses, top1, top5, count = [], 0, 0, 0

  def consume(out):
    nonlocal top1, top5, count
    out = runtime.to_host(out)
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
    raise DataError("the eval split produced no examples")
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
  from clu import metric_writers  # pylint: disable=g-import-not-at-top (it imports TensorFlow; the step does not)
  from resnext_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  mesh = mesh if mesh is not None else runtime.make_mesh()
  runtime.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
  compilation_cache.enable_from_config(config)
  info = input_pipeline.get_dataset_info(config)
  step = config.eval_checkpoint_step if config.eval_checkpoint_step >= 0 else None
  model, variables, step, meta = checkpoint.load_variables(config, workdir, mesh, info.image_shape, step)
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
