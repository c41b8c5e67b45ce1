"""Orbax checkpoints shared by training, evaluation, prediction, weight conversion and fine-tuning.

Each step directory holds up to three items, so every consumer restores only what it needs:
  'model': {'params', 'batch_stats'} (+ 'ema_params', 'ema_batch_stats' when an EMA is kept)
  'train': the rest of the training state (step, optimizer state, RNG, ...); absent in converted weights
  'meta':  JSON: at least 'model' (registry name) and 'num_classes'; training adds 'model_overrides' (the
           architecture fields, models.config_overrides), 'ema' and its config
Restoring takes abstract targets (shapes, dtypes, shardings), so a checkpoint written on one device layout
restores onto any other. Orbax writes each step to a temporary directory and renames it when complete, so
an interrupted save never damages an earlier, good checkpoint. `load_variables` rebuilds the model a
checkpoint's meta names and restores its weights: what eval, predict, export and fine-tuning start from.

Keep-best (issue 15): with config.keep_best_checkpoints = k > 0 training also keeps, in WORKDIR/checkpoints_best, the
k checkpoints with the highest eval metric (config.best_checkpoint_metric, default top-1), each saved right after
its eval with the eval results as its Orbax metrics (Orbax's best_fn / best_mode='max'). They hold the 'model'
and 'meta' items only (no optimizer state: resumption reads WORKDIR/checkpoints, as before) and are written
the same atomic way. `load_variables(..., best=True)` reads the best of them.
"""

import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from resnext_jax import models
from resnext_jax import runtime
from resnext_jax.errors import CheckpointError

ITEMS = ("model", "train", "meta")
CHECKPOINT_SUBDIR = "checkpoints"  # under a training workdir, beside the TensorBoard event files


def model_item(params, batch_stats, ema_params=None, ema_batch_stats=None) -> dict:
  """The 'model' item: the weights, and the EMA weights beside them under 'ema_' names when kept."""
  item = {"params": params, "batch_stats": batch_stats}
  if ema_params is not None:
    item.update(ema_params=ema_params, ema_batch_stats=ema_batch_stats)
  return item


def inference_variables(item) -> dict:
  """A 'model' item as eval and predict take it: {'params', 'batch_stats'[, 'ema': {'params', 'batch_stats'}]}."""
  out = {"params": item["params"], "batch_stats": item["batch_stats"]}
  if item.get("ema_params") is not None:
    out["ema"] = {"params": item["ema_params"], "batch_stats": item["ema_batch_stats"]}
  return out


def model_variables(variables) -> dict:
  """{'params', 'batch_stats'} of inference variables: the trained weights, without their EMA copy."""
  return {k: variables[k] for k in ("params", "batch_stats")}


def create_manager(directory, *, max_to_keep=None, async_save=True, read_only=False):
  """A CheckpointManager over `directory` (absolute path; created unless read_only)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                         create=not read_only, read_only=read_only,
                                         save_interval_steps=0 if read_only else 1)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def save(manager, step, *, model, meta, train=None, force=True):
  """Saves one step (asynchronously if the manager is). Every process must call this."""
  items = dict(model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta))
  if train is not None:
    items["train"] = ocp.args.StandardSave(train)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


# --- Keep-best checkpoints (beside the latest ones). ---

BEST_CHECKPOINT_SUBDIR = "checkpoints_best"


def best_checkpoint_directory(workdir) -> str:
  """WORKDIR/checkpoints_best: the checkpoints kept for their eval metric."""
  return os.path.join(os.path.abspath(workdir), BEST_CHECKPOINT_SUBDIR)


def _metric_fn(metric: str):
  def get(metrics) -> float:
    if metric not in metrics:
      raise CheckpointError(f"best checkpoints are ranked by {metric!r}, but a checkpoint's metrics only have "
                            f"{sorted(metrics)}")
    return float(metrics[metric])
  return get


def create_best_manager(directory, *, max_to_keep, metric="top1", async_save=True, read_only=False):
  """A CheckpointManager keeping the `max_to_keep` checkpoints with the highest `metric` (Orbax's best_fn,
  best_mode='max'; checkpoints without metrics are not kept). None keeps them all (read-only use)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, best_fn=_metric_fn(metric), best_mode="max",
                                         keep_checkpoints_without_metrics=False,
                                         enable_async_checkpointing=async_save, create=not read_only,
                                         read_only=read_only, save_interval_steps=0 if read_only else 1)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def save_best(manager, step, *, model, meta, metrics) -> bool:
  """Offers one evaluated step to a best manager (every process must call this): saved with its metrics, then
  Orbax deletes whatever falls out of the best max_to_keep. A step already there (a resumed run evaluating a
  step again) is left as it is. Returns whether a save started."""
  if step in manager.all_steps():
    return False
  scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
  return manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=scalars, force=True)


def best_step(directory, metric="top1"):
  """(best step, its metrics) among the checkpoints in a keep-best directory; CheckpointError when none."""
  if not has_checkpoint(directory):
    raise CheckpointError(f"no best checkpoint in {directory} (train with config.keep_best_checkpoints > 0)")
  manager = create_best_manager(directory, max_to_keep=None, metric=metric, async_save=False, read_only=True)
  try:
    step = manager.best_step()
    if step is None:
      raise CheckpointError(f"no best checkpoint in {directory}")
    return step, manager.metrics(step)
  finally:
    manager.close()


def checkpoint_directory(workdir) -> str:
  """Where a workdir's checkpoints are: WORKDIR/checkpoints (training), or WORKDIR itself when it is a
  checkpoint root (converted weights: WORKDIR/0/...)."""
  workdir = os.path.abspath(workdir)
  nested = os.path.join(workdir, CHECKPOINT_SUBDIR)
  if os.path.isdir(nested) or not _has_step_dirs(workdir):
    return nested
  return workdir


def has_checkpoint(directory) -> bool:
  """Whether `directory` holds at least one finished step (without raising on a missing directory)."""
  return _has_step_dirs(directory)


def _has_step_dirs(directory) -> bool:
  return os.path.isdir(directory) and any(name.isdigit() and os.path.isdir(os.path.join(directory, name))
                                          for name in os.listdir(directory))


def _open(directory):
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  manager = create_manager(directory, read_only=True, async_save=False)
  if manager.latest_step() is None:
    raise CheckpointError(f"no checkpoint found in {directory}")
  return manager


def _step(manager, directory, step):
  if step is None or step < 0:
    return manager.latest_step()
  if step not in manager.all_steps():
    raise CheckpointError(f"no checkpoint for step {step} in {directory}; available: {manager.all_steps()}")
  return step


def load_meta(directory, step=None, *, manager=None):
  """Returns (step, meta dict) of the latest (or given) checkpoint in `directory`."""
  manager = manager or _open(directory)
  step = _step(manager, directory, step)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # Orbax raises many types for a damaged directory; name the path instead.
    raise CheckpointError(f"checkpoint {directory} step {step} is damaged or unreadable (meta): {e}") from e
  return step, dict(meta)


def restore(directory, *, model_target, train_target=None, step=None) -> dict[str, Any]:
  """Restores 'model' (and 'train' if a target is given) onto the targets' shardings.

  Returns {'step', 'model', 'train' (or None), 'meta'}.
  """
  manager = _open(directory)
  step, meta = load_meta(directory, step, manager=manager)
  items = dict(model=ocp.args.StandardRestore(model_target))
  if train_target is not None:
    items["train"] = ocp.args.StandardRestore(train_target)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:
    raise CheckpointError(f"checkpoint {directory} step {step} could not be restored: {e}") from e
  return dict(step=step, model=restored["model"], train=restored.get("train"), meta=meta)


# --- Inference: a checkpoint's weights in the architecture its meta names. ---


def abstract_variables(model, image_shape, mesh) -> dict:
  """{'params', 'batch_stats'} as ShapeDtypeStructs with replicated shardings: Orbax's restore target."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  return runtime.abstract_replicated({k: shapes[k] for k in ("params", "batch_stats")}, mesh)


def inference_checkpoint(config, workdir) -> str:
  """The workdir's checkpoints if it has any, else config.init_checkpoint (e.g. converted torchvision weights)."""
  directory = checkpoint_directory(workdir)
  if has_checkpoint(directory) or not config.init_checkpoint:
    return directory
  return checkpoint_directory(config.init_checkpoint)


def load_variables(config, workdir, mesh, image_shape, step=None, *, best=False, best_metric="top1"):
  """restore_variables for `config`: the workdir's checkpoint (else config.init_checkpoint), config's conv impl
  and precision. best=True: the best of WORKDIR/checkpoints_best by `best_metric` (or `step` among them)."""
  if best:
    directory = best_checkpoint_directory(workdir)
    if step is None or step < 0:
      step, metrics = best_step(directory, best_metric)
      logging.info("Best checkpoint by %s: step %d (%s).", best_metric, step, metrics)
  else:
    directory = inference_checkpoint(config, workdir)
  return restore_variables(directory, mesh, image_shape, step=step,
                           conv_impl=config.conv_impl, half_precision=config.half_precision,
                           frozen_stages=config.get("frozen_stages", 0))


def load_evaluated(config, workdir, mesh, image_shape):
  """load_variables with the checkpoint eval and predict take: config.eval_checkpoint ('latest', or 'best' by
  config.best_checkpoint_metric) at config.eval_checkpoint_step (-1: the latest, or the best)."""
  step = config.eval_checkpoint_step if config.eval_checkpoint_step >= 0 else None
  return load_variables(config, workdir, mesh, image_shape, step,
                        best=config.get("eval_checkpoint", "latest") == "best",
                        best_metric=config.get("best_checkpoint_metric", "top1"))


def restore_variables(directory, mesh, image_shape, *, step=None, conv_impl="auto", half_precision=False,
                      frozen_stages=0):
  """Restores a training or converted checkpoint for inference.

  Returns (model, {'params', 'batch_stats'[, 'ema']}, step, meta); the architecture and class count come from
  the checkpoint's meta, so any config (e.g. the one that trained it) evaluates it.
  """
  step, meta = load_meta(directory, step)
  model = models.build(meta["model"], int(meta["num_classes"]), meta.get("model_overrides", {}),
                       conv_impl=conv_impl, half_precision=half_precision, frozen_stages=frozen_stages)
  target = abstract_variables(model, image_shape, mesh)
  ema = (target["params"], target["batch_stats"]) if meta.get("ema") else ()  # restored beside the weights
  target = model_item(target["params"], target["batch_stats"], *ema)
  restored = restore(directory, model_target=target, step=step)
  logging.info("Loaded %s (step %d, model %s, %d classes).", directory, step, meta["model"], meta["num_classes"])
  return model, inference_variables(restored["model"]), step, meta
