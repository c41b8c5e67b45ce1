"""Evaluation: the jitted eval step, the masked eval loop, and `--mode=eval` on a saved checkpoint.

Every eval example counts exactly once: the input pipeline pads the last batches and carries a mask, and the
step returns per-example results gathered to every process, so sums are taken on the host over exactly the
masked-in examples. Counts are therefore identical on any number of devices and processes; losses are added
with math.fsum (exactly rounded, independent of order), so they differ only where XLA rounds a logit
differently for a different per-device batch (~1e-9 relative).
The eval loss is the softmax cross-entropy whatever the training loss (config.loss='bce' too), as timm's validate.

Evaluation tools (issue 15):
- Confusion matrix and per-class accuracy: the step also returns each example's predicted class (its top-1) and
  label, and the host adds the masked-in pairs into a (C, C) int64 matrix (rows: true class, columns: predicted),
  so the matrix is exact and its diagonal sums to the top-1 count. Written as JSON and PNG (`write_confusion`)
  in --mode=eval and at the final eval of training; periodic evals only report the scalars (the counting is
  cheap, but a 1000-class PNG is not, and each one would be overwritten by the next).
- Flip test-time augmentation (config.eval_flip_tta): the logits of the image and of its horizontal mirror are
  averaged, inside the step; the loss, top-1 and top-5 are those of the averaged logits. That is what timm's
  train.py/validate.py do with --tta (`output.unfold(0, k, k).mean(dim=2)` on the model's outputs, i.e. logits).
- Another resolution (config.eval_image_size, 0 = image_size): `input_pipeline.eval_config` gives the eval
  pipeline a config
  whose image_size is the eval size, so every eval transform (resize the shorter side to size / crop_ratio,
  center-crop size; digits and CIFAR: a plain resize to size), the padding and the synthetic batches use it.
  The model is fully convolutional with global pooling, so its weights apply at any size.
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
from resnext_jax import compilation_cache
from resnext_jax import cpu
from resnext_jax import input_pipeline
from resnext_jax import runtime
from resnext_jax.errors import ConfigError, DataError
from resnext_jax.optim import cross_entropy

CONFUSION_NAME = "confusion_matrix"  # + .json / .png; 'ema_' in front for the EMA weights


def eval_step(variables, batch, *, model, flip_tta: bool = False) -> dict:
  """Per-example loss, top-1 and top-5 hits, predicted class, label and mask for one (padded) batch.

  flip_tta: logits = mean of the logits of the image and of its horizontal flip (NHWC: axis 2 is the width).
  """
  images = batch["image"]
  logits = model.apply(variables, images, train=False)
  if flip_tta:
    flipped = model.apply(variables, jnp.flip(images, axis=2), train=False)
    logits = (logits.astype(jnp.float32) + flipped.astype(jnp.float32)) / 2
  labels = batch["label"]
  top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return {"loss": cross_entropy(logits, labels, logits.shape[-1]),
          "top1": top[:, 0] == labels,
          "top5": jnp.any(top == labels[:, None], axis=-1),
          "pred": top[:, 0].astype(jnp.int32),
          "label": labels.astype(jnp.int32),
          "mask": batch["mask"].astype(bool)}


def compile_eval_step(model, mesh, *, flip_tta: bool = False):
  """eval_step jitted over the mesh; outputs replicated so every process sees every example's result."""
  return jax.jit(functools.partial(eval_step, model=model, flip_tta=flip_tta),
                 in_shardings=(runtime.replicated(mesh), runtime.batch_sharded(mesh)),
                 out_shardings=runtime.replicated(mesh), compiler_options=cpu.compiler_options())


def run_evaluation(p_eval_step, variables, batches, *, confusion: np.ndarray | None = None) -> dict:
  """{'top1', 'top5', 'loss', 'num_examples'} over the masked-in examples of `batches`.

  confusion: a (C, C) integer array to which each masked-in example adds 1 at [label, predicted class].
  """
  losses, top1, top5, count = [], 0, 0, 0

  def consume(out):
    nonlocal top1, top5, count
    out = runtime.to_host(out)
    m = out["mask"]
    losses.extend(out["loss"][m].astype(np.float64).tolist())
    top1 += int(out["top1"][m].sum())
    top5 += int(out["top5"][m].sum())
    count += int(m.sum())
    if confusion is not None:
      np.add.at(confusion, (out["label"][m], out["pred"][m]), 1)

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


BEST_METRICS = ("top1", "top5", "ema_top1", "ema_top5")  # higher is better: ranked with best_mode='max'
EVAL_CHECKPOINTS = ("latest", "best")


def check_eval_config(config) -> None:
  """The evaluation tools' settings (issue 15), checked before anything is built."""
  input_pipeline.eval_image_size(config)
  if config.get("keep_best_checkpoints", 0) < 0:
    raise ConfigError(f"config.keep_best_checkpoints must be >= 0 (0: off), got {config.keep_best_checkpoints}")
  metric = config.get("best_checkpoint_metric", "top1")
  if metric not in BEST_METRICS:
    raise ConfigError(f"config.best_checkpoint_metric must be one of {', '.join(BEST_METRICS)}, got {metric!r}")
  if metric.startswith("ema_") and config.get("keep_best_checkpoints", 0) > 0 and not config.ema_decay > 0:
    raise ConfigError(f"config.best_checkpoint_metric={metric!r} needs an EMA (config.ema_decay > 0)")
  if config.get("eval_checkpoint", "latest") not in EVAL_CHECKPOINTS:
    raise ConfigError(f"config.eval_checkpoint must be one of {', '.join(EVAL_CHECKPOINTS)}, got "
                      f"{config.eval_checkpoint!r}")


def evaluate_all(p_eval_step, variables, config, mesh, *, confusions: dict | None = None,
                 num_classes: int = 0) -> dict:
  """Evaluates the weights, and the EMA weights (keys prefixed 'ema_') when present, at eval_image_size.

  confusions: a dict to fill with (num_classes, num_classes) int64 confusion matrices, under '' (the weights)
  and 'ema_'.
  """
  weights = [("", checkpoint.model_variables(variables))]
  if variables.get("ema") is not None:
    weights.append(("ema_", variables["ema"]))
  config_for_eval = input_pipeline.eval_config(config)
  result = {}
  for prefix, v in weights:
    matrix = None
    if confusions is not None:
      if num_classes <= 0:
        raise ValueError("evaluate_all: confusions need num_classes")
      matrix = confusions[prefix] = np.zeros((num_classes, num_classes), np.int64)
    out = run_evaluation(p_eval_step, v, input_pipeline.create_eval_iterator(config_for_eval, mesh),
                         confusion=matrix)
    result.update({f"{prefix}{k}": x for k, x in out.items() if not (prefix and k == "num_examples")})
  return result


def trace_ahead(p_eval_step, variables, config, mesh):
  """p_eval_step traced for evaluate_all's batches before any eval input is read (jax.stages.Traced): compiled,
  evaluate_all's calls reuse it, and on a CPU 'auto' has timed the eval-mode layers while no input pipeline
  decoded on the same cores."""
  spec = input_pipeline.eval_batch_spec(input_pipeline.eval_config(config), mesh)
  return p_eval_step.trace(checkpoint.model_variables(variables), spec)


def write_eval_metrics(writer, step: int, result: dict) -> None:
  writer.write_scalars(step, {f"eval_{k}": v for k, v in result.items() if k != "num_examples"})
  writer.flush()


def result_line(step: int, result: dict) -> str:
  """The JSON object printed as the last line of stdout by train and eval."""
  return json.dumps({"step": int(step), **result}, sort_keys=False)


# --- Confusion matrix and per-class accuracy. ---


def confusion_summary(matrix: np.ndarray, class_names, **info) -> dict:
  """The JSON report of a (C, C) confusion matrix (rows: true class, columns: predicted class).

  per_class_accuracy[c] = matrix[c, c] / counts[c] (None for a class without eval examples).
  """
  matrix = np.asarray(matrix, np.int64)
  counts = matrix.sum(axis=1)
  correct = np.diag(matrix)
  names = list(class_names) if class_names is not None and len(class_names) == len(matrix) else [
      str(i) for i in range(len(matrix))]
  accuracy = [int(c) / int(n) if n else None for c, n in zip(correct, counts)]
  total = int(counts.sum())
  return {**info, "num_examples": total, "top1": int(correct.sum()) / total if total else None,
          "class_names": names, "counts": counts.tolist(), "correct": correct.tolist(),
          "per_class_accuracy": accuracy, "predicted_counts": matrix.sum(axis=0).tolist(),
          "confusion_matrix": matrix.tolist()}


def write_confusion(directory: str, confusions: dict, class_names, *, step: int, **info) -> list[str]:
  """Writes DIRECTORY/[ema_]confusion_matrix.json and .png for each matrix (process 0); returns the paths."""
  if jax.process_index() != 0 or not confusions:
    return []
  from resnext_jax import plots  # pylint: disable=g-import-not-at-top (matplotlib only when writing)
  os.makedirs(directory, exist_ok=True)
  paths = []
  for prefix, matrix in sorted(confusions.items()):
    summary = confusion_summary(matrix, class_names, step=int(step), weights="ema" if prefix else "model",
                                **info)
    base = os.path.join(directory, f"{prefix}{CONFUSION_NAME}")
    with open(base + ".json.tmp", "w", encoding="utf-8") as f:
      json.dump(summary, f)
    os.replace(base + ".json.tmp", base + ".json")  # never a half-written report
    title = (f"{'EMA ' if prefix else ''}step {step}: top-1 {summary['top1']:.4f} "
             f"({summary['num_examples']} examples)")
    plots.plot_confusion(matrix, summary["class_names"], base + ".png", title=title)
    paths += [base + ".json", base + ".png"]
  logging.info("Wrote %s.", ", ".join(paths))
  return paths


def report_info(config, checkpoint_kind: str = "latest") -> dict:
  """What the confusion reports record about how they were evaluated."""
  return {"checkpoint": checkpoint_kind, "eval_image_size": input_pipeline.eval_image_size(config),
          "train_image_size": int(config.image_size), "flip_tta": bool(config.get("eval_flip_tta", False)),
          "dataset": config.dataset, "eval_split": config.eval_split}


# --- --mode=eval. ---


def evaluate(config, workdir, *, mesh=None) -> dict[str, Any]:
  """--mode=eval: the latest (or config.eval_checkpoint_step) checkpoint on the full eval split, once.

  config.eval_checkpoint='best' evaluates the best kept checkpoint (WORKDIR/checkpoints_best, by
  config.best_checkpoint_metric) instead; with eval_checkpoint_step, that step among the best kept ones.
  Writes WORKDIR/eval/[ema_]confusion_matrix.{json,png} when config.eval_confusion_matrix.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top (it imports TensorFlow; the step does not)
  mesh = mesh if mesh is not None else runtime.make_mesh()
  runtime.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
  compilation_cache.enable_from_config(config)
  check_eval_config(config)
  cpu.prepare(config.conv_impl)  # the first-use kernel build overlaps what follows
  info = input_pipeline.get_dataset_info(config)
  model, variables, step, meta = checkpoint.load_evaluated(config, workdir, mesh, info.image_shape)
  if int(meta["num_classes"]) != info.num_classes:
    raise ConfigError(f"checkpoint has {meta['num_classes']} classes but dataset {config.dataset!r} has "
                      f"{info.num_classes}")
  confusions = {} if config.get("eval_confusion_matrix", True) else None
  p_eval_step = compile_eval_step(model, mesh, flip_tta=config.get("eval_flip_tta", False))
  cpu.autotune.measure_layers(lambda: trace_ahead(p_eval_step, variables, config, mesh)).lower().compile()
  result = evaluate_all(p_eval_step, variables, config, mesh, confusions=confusions,
                        num_classes=int(meta["num_classes"]))
  os.makedirs(workdir, exist_ok=True)
  if confusions:
    write_confusion(os.path.join(workdir, "eval"), confusions, meta.get("class_names") or info.class_names,
                    step=step, **report_info(config, config.get("eval_checkpoint", "latest")))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                collection="eval")
  write_eval_metrics(writer, step, result)
  writer.close()
  print(result_line(step, result), flush=True)
  return {"step": step, **result}
