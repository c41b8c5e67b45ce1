"""Training loop: sharded jit over a 'data' mesh of every device of every process, Orbax, clu.

The state is created already sharded (`jax.eval_shape`, then `jax.jit(init, out_shardings=...)`) and donated to
each step. With the batch sharded over the mesh and the parameters replicated, XLA inserts the gradient all-reduce
and BatchNorm's batch statistics are global (synchronised BN) without pmap or pmean. A run restarted on the same
workdir resumes from the latest checkpoint (step, optimizer, BN statistics, EMA, RNG; the input pipeline starts at
that step) and ends exactly as an uninterrupted run would.
"""

import concurrent.futures
import contextlib
import functools
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import flax
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from resnext_jax import checkpoint
from resnext_jax import compilation_cache
from resnext_jax import cpu
from resnext_jax import evaluate
from resnext_jax import input_pipeline
from resnext_jax import mixing
from resnext_jax import models
from resnext_jax import optim
from resnext_jax import runtime
from resnext_jax.errors import ConfigError, TrainingError


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any        # None without EMA
  ema_batch_stats: Any
  rng: jax.Array         # raw key data (uint32), so that Orbax stores it as a plain array

  def model_item(self) -> dict:
    """The checkpoint's 'model' item (what eval, predict and fine-tuning read)."""
    return checkpoint.model_item(self.params, self.batch_stats, self.ema_params, self.ema_batch_stats)

  def train_item(self) -> dict:
    return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}

  def with_items(self, model: dict, train: dict) -> "TrainState":
    return self.replace(params=model["params"], batch_stats=model["batch_stats"],
                        ema_params=model.get("ema_params"), ema_batch_stats=model.get("ema_batch_stats"),
                        step=train["step"], opt_state=train["opt_state"], rng=train["rng"])


# --- State and step (importable: the benchmark reuses them). ---


def _state_initializer(config, model, tx, image_shape):
  """init(rng) -> TrainState with fresh weights (He init), zero momentum, EMA = weights."""

  def init(rng):
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    ema = config.ema_decay > 0
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema_params=params if ema else None,
                      ema_batch_stats=batch_stats if ema else None, rng=jax.random.key_data(train_rng))

  return init


def abstract_train_state(config, model, tx, mesh, image_shape):
  """(ShapeDtypeStructs with shardings, shardings) of the state: Orbax's restore target, no FLOPs spent."""
  rng = jax.random.key(config.seed, impl=config.rng_impl)
  shapes = jax.eval_shape(_state_initializer(config, model, tx, image_shape), rng)
  abstract = runtime.abstract_replicated(shapes, mesh)
  return abstract, jax.tree.map(lambda s: s.sharding, abstract)


def create_train_state(config, model, tx, mesh, image_shape, rng=None):
  """Returns (state, state_sharding): initialised directly onto the mesh (params replicated).

  The initialiser runs once, so on a CPU it is compiled for compile speed, not run speed (cpu/options.py).
  """
  rng = jax.random.key(config.seed, impl=config.rng_impl) if rng is None else rng
  _, sharding = abstract_train_state(config, model, tx, mesh, image_shape)
  init = _state_initializer(config, model, tx, image_shape)
  return jax.jit(init, out_shardings=sharding, compiler_options=cpu.run_once_options())(rng), sharding


def accumulate_gradients(grad_fn, params, aux, batch, num_micro: int, rng=None):
  """Mean of grad_fn over `num_micro` equal micro-batches (gradient accumulation inside one step).

  grad_fn(params, aux, micro) -> ((loss, (aux, correct)), grads); aux (BN statistics) is threaded through the
  micro-batches in order. Micro-batch i takes examples i, i + k, ... so each device keeps its own shard.
  With `rng` (a key), grad_fn also takes micro-batch i's key, fold_in(rng, i) (rng itself for one micro-batch),
  so that random layers (drop path) draw anew in each micro-batch.
  Returns (grads, mean loss, aux, accuracy).
  """
  if num_micro == 1:
    (loss, (aux, correct)), grads = grad_fn(params, aux, batch) if rng is None else grad_fn(params, aux, batch, rng)
    return grads, loss, aux, correct.mean()
  micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1),
                       batch)
  xs = micro if rng is None else (micro, jnp.arange(num_micro))

  def body(carry, x):
    grads_sum, aux, loss_sum, correct_sum = carry
    if rng is None:
      (loss, (aux, correct)), grads = grad_fn(params, aux, x)
    else:
      (loss, (aux, correct)), grads = grad_fn(params, aux, x[0], jax.random.fold_in(rng, x[1]))
    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
    return (grads_sum, aux, loss_sum + loss, correct_sum + correct.mean()), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, aux, loss, correct), _ = jax.lax.scan(body, (zeros, aux, 0.0, 0.0), xs)
  return jax.tree.map(lambda g: g / num_micro, grads), loss / num_micro, aux, correct / num_micro


# A constant folded into the step's key for the Mixup/CutMix draws, apart from the model's 'dropout' stream.
_MIX_STREAM = 0x6D6978


def train_step(state: TrainState, batch, *, model, tx, schedule, label_smoothing=0.0, grad_accum_steps=1,
               ema_decay=0.0, rng_impl="threefry2x32", mixup=None, loss="softmax_cross_entropy",
               bce_target_threshold=0.0):
  """One optimiser update on a global batch; returns (new state, replicated scalar metrics).

  The step's key is fold_in(state.rng, step): the model's 'dropout' stream (drop path) and, folded with
  _MIX_STREAM, the Mixup/CutMix draws. `mixup` (a mixing.Mixup, or None) mixes the global batch with its reverse
  before it is split into micro-batches, with label smoothing folded into the soft targets. loss is
  'softmax_cross_entropy' (on the labels, as the paper; on soft targets where mixed, timm's
  SoftTargetCrossEntropy) or 'bce' (timm's BinaryCrossEntropy on the smoothed, mixed targets, thresholded at
  bce_target_threshold > 0). Accuracy is counted against the unmixed labels.
  Without mixing, drop path or BCE the step is the plain recipe's: nothing is drawn and no target is formed.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=rng_impl), state.step)
  if mixup is not None:
    images, targets, _ = mixing.mix_batch(jax.random.fold_in(rng, _MIX_STREAM), mixup, batch["image"],
                                          batch["label"])
    batch = {**batch, "image": images, "target": targets}
  elif loss != "softmax_cross_entropy":
    batch = {**batch, "target": mixing.mixup_target(batch["label"], model.num_classes, 1.0, label_smoothing)}

  def loss_fn(params, batch_stats, micro, rng=rng):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, micro["image"], train=True,
                                  mutable=["batch_stats"], rngs={"dropout": rng})
    if loss == "bce":
      per_example = optim.binary_cross_entropy(logits, micro["target"], bce_target_threshold)
    elif "target" in micro:
      per_example = optim.soft_target_cross_entropy(logits, micro["target"])
    else:
      per_example = optim.cross_entropy(logits, micro["label"], logits.shape[-1], label_smoothing)
    return per_example.mean(), (updates["batch_stats"], jnp.argmax(logits, -1) == micro["label"])

  # Drop path draws in each micro-batch anew (one micro-batch: the step's key, as the model always had).
  micro_rng = rng if grad_accum_steps > 1 and getattr(model, "drop_path_rate", 0.0) > 0 else None
  grads, loss_value, batch_stats, accuracy = accumulate_gradients(
      jax.value_and_grad(loss_fn, has_aux=True), state.params, state.batch_stats, batch, grad_accum_steps,
      micro_rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  if ema_decay > 0:
    new = new.replace(ema_params=optim.ema_update(state.ema_params, params, ema_decay),
                      ema_batch_stats=optim.ema_update(state.ema_batch_stats, batch_stats, ema_decay))
  metrics = {"loss": loss_value, "accuracy": accuracy, "learning_rate": schedule(state.step),
             "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
  return new, metrics


def train_step_options(config, model) -> dict:
  """train_step's keyword arguments from `config` (checked: a bad value is a ConfigError naming its key)."""
  if config.grad_accum_steps < 1:
    raise ConfigError(f"config.grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
  if not 0 <= config.label_smoothing < 1:
    raise ConfigError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing}")
  return dict(label_smoothing=config.label_smoothing, grad_accum_steps=config.grad_accum_steps,
              ema_decay=config.ema_decay, rng_impl=config.rng_impl, mixup=mixing.from_config(config, model.num_classes),
              loss=optim.check_loss_config(config), bce_target_threshold=config.get("bce_target_threshold", 0.0))


def compile_train_step(config, model, tx, schedule, mesh, state_sharding):
  """train_step jitted with the state donated, batch sharded on 'data' and metrics replicated."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, **train_step_options(config, model))
  return jax.jit(step, in_shardings=(state_sharding, runtime.batch_sharded(mesh)),
                 out_shardings=(state_sharding, runtime.replicated(mesh)), donate_argnums=0,
                 compiler_options=cpu.compiler_options())


# --- Checkpoint plumbing. ---


def training_meta(config, info) -> dict:
  """The checkpoint's 'meta' item: what eval/predict need to rebuild the model without the config."""
  return {"model": config.model, "num_classes": info.num_classes, "model_overrides": models.config_overrides(config),
          "ema": config.ema_decay > 0, "dataset": config.dataset, "image_size": config.image_size,
          "class_names": list(info.class_names), "config": json.loads(config.to_json_best_effort())}


def _restore_or_initialize(config, model, tx, mesh, image_shape, ckpt_dir):
  """Resumes from the workdir's latest checkpoint, else starts from config.init_checkpoint, else fresh.

  Returns (state, state_sharding); a resumed state is restored straight onto the mesh, never initialised.
  """
  abstract, sharding = abstract_train_state(config, model, tx, mesh, image_shape)
  if checkpoint.has_checkpoint(ckpt_dir):
    restored = checkpoint.restore(ckpt_dir, model_target=abstract.model_item(),
                                  train_target=abstract.train_item())
    logging.info("Resuming from %s at step %d.", ckpt_dir, restored["step"])
    return abstract.with_items(restored["model"], restored["train"]), sharding
  state, sharding = create_train_state(config, model, tx, mesh, image_shape)
  if config.init_checkpoint:
    state = _initialize_from(config, state, sharding, mesh, image_shape)
  return state, sharding


def _initialize_from(config, state, state_sharding, mesh, image_shape):
  """Fine-tuning: copies every checkpoint parameter whose name and shape match (a new head stays fresh)."""
  directory = checkpoint.checkpoint_directory(config.init_checkpoint)
  _, variables, step, _ = checkpoint.load_variables(config, config.init_checkpoint, mesh, image_shape)
  skipped = []

  def merge(fresh, loaded):
    flat_loaded = traverse_util.flatten_dict(loaded)
    out = {}
    for path, value in traverse_util.flatten_dict(fresh).items():
      old = flat_loaded.get(path)
      if old is not None and old.shape == value.shape:
        out[path] = old.astype(value.dtype)
      else:
        out[path] = value
        skipped.append("/".join(path))
    return traverse_util.unflatten_dict(out)

  params = merge(state.params, variables["params"])
  batch_stats = merge(state.batch_stats, variables["batch_stats"])
  state = state.replace(params=params, batch_stats=batch_stats)
  if state.ema_params is not None:
    state = state.replace(ema_params=params, ema_batch_stats=batch_stats)
  logging.info("Initialised from %s step %d; kept fresh (name or shape differs): %s", directory, step,
               ", ".join(skipped) or "nothing")
  return jax.device_put(state, state_sharding)


# --- Preemption. ---


@contextlib.contextmanager
def _preemption_watch():
  """Yields should_stop(step): True once SIGTERM arrived (on several processes, at a step all agree on)."""
  if jax.process_count() > 1:
    # jax.distributed's preemption service owns SIGTERM and picks a common step for every process.
    yield multihost_utils.reached_preemption_sync_point
    return
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield lambda step: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)


# --- The loop. ---


class _TrainMetrics:
  """Host-side running means of the step metrics, filled one step late so the device never waits."""

  def __init__(self):
    self.sums, self.count, self.pending = {}, 0, None

  def add(self, step, metrics):
    if self.pending is not None:
      self._consume(*self.pending)
    self.pending = (step, metrics)

  def flush(self):
    if self.pending is not None:
      self._consume(*self.pending)
      self.pending = None

  def _consume(self, step, metrics):
    values = runtime.to_host(metrics)
    for name in ("loss", "param_norm"):  # a finite loss can still leave non-finite weights behind
      if not np.isfinite(values[name]):
        raise _NonFinite(step, name, float(values[name]))
    for k, v in values.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1

  def summary(self):
    out = {("train_" + k if k in ("loss", "accuracy") else k): v / self.count for k, v in self.sums.items()}
    self.sums, self.count = {}, 0
    return out


class _NonFinite(Exception):

  def __init__(self, step, name, value):
    super().__init__(step, name, value)
    self.step, self.name, self.value = step, name, value


def check_config(config, mesh) -> None:
  """User errors that would otherwise surface deep inside XLA or Orbax."""
  if config.grad_accum_steps < 1:
    raise ConfigError(f"config.grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
  runtime.check_batch_size("batch_size", config.batch_size, mesh, config.grad_accum_steps)
  runtime.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
  if config.checkpoint_every_steps <= 0 or config.log_every_steps <= 0:
    raise ConfigError("config.checkpoint_every_steps and config.log_every_steps must be positive")
  if not 0 <= config.ema_decay < 1:
    raise ConfigError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
  mixing.from_config(config, num_classes=1)  # mixup/cutmix keys and loss keys, before any work is done
  optim.check_loss_config(config)


def train_and_evaluate(config, workdir: str, *, mesh=None) -> dict | None:
  """Trains (resuming if the workdir has a checkpoint), evaluating as it goes; prints the final eval as JSON.

  Returns the final eval metrics, or None when the run stopped early (preemption, config.stop_after_steps).
  """
  mesh = mesh if mesh is not None else runtime.make_mesh()
  check_config(config, mesh)
  evaluate.check_eval_config(config)
  cpu.prepare(config.conv_impl)  # the first-use kernel build overlaps what follows
  compilation_cache.enable_from_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  info = input_pipeline.get_dataset_info(config)
  d = optim.durations(config, info.num_train_examples)
  model = models.from_config(config, info.num_classes)
  schedule = optim.learning_rate_schedule(config, d)
  tx = optim.create_optimizer(config, schedule)
  ckpt_dir = checkpoint.checkpoint_directory(workdir)
  state, state_sharding = _restore_or_initialize(config, model, tx, mesh, info.image_shape, ckpt_dir)
  logging.info("Training %s on %s: %d steps (%d per epoch), batch %d on %d devices / %d processes.",
               config.model, config.dataset, d.num_train_steps, d.steps_per_epoch, config.batch_size,
               mesh.devices.size, jax.process_count())

  manager = checkpoint.create_manager(ckpt_dir, max_to_keep=config.keep_checkpoints,
                                      async_save=config.async_checkpointing)
  best_manager = None  # keep-best (issue 15): the best evals' weights, beside the latest checkpoints
  if config.get("keep_best_checkpoints", 0) > 0:
    best_manager = checkpoint.create_best_manager(
        checkpoint.best_checkpoint_directory(workdir), max_to_keep=config.keep_best_checkpoints,
        metric=config.best_checkpoint_metric, async_save=config.async_checkpointing)
  from clu import metric_writers  # pylint: disable=g-import-not-at-top (it imports TensorFlow; the step does not)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  meta = training_meta(config, info)
  try:
    return _loop(config, workdir, mesh, d, model, tx, schedule, state, state_sharding, manager, ckpt_dir, writer,
                 meta, best_manager, num_eval_examples=info.num_eval_examples)
  finally:
    for m in (manager, best_manager):
      if m is not None:
        m.wait_until_finished()  # an async save in flight is a good checkpoint: let it land
        m.close()
    writer.close()


def _loop(config, workdir, mesh, d, model, tx, schedule, state, state_sharding, manager, ckpt_dir, writer, meta,
          best_manager=None, *, num_eval_examples):
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top (imports TensorFlow)
  step = int(runtime.to_host(state.step))
  p_train_step = compile_train_step(config, model, tx, schedule, mesh, state_sharding)
  p_eval_step = evaluate.compile_eval_step(model, mesh, flip_tta=config.get("eval_flip_tta", False))
  report = periodic_actions.ReportProgress(num_train_steps=d.num_train_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  hooks = [report]
  if config.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_num_steps,
                                          profile_duration_ms=None, first_profile=config.profile_first_step))
  metrics = _TrainMetrics()
  result, last_eval_step = None, -1

  def save():
    checkpoint.save(manager, step, model=state.model_item(), train=state.train_item(), meta=meta)

  def run_eval(final=False):
    nonlocal result, last_eval_step
    # The final eval also writes the confusion matrices (evaluate.py says why only that one).
    confusions = {} if final and config.get("eval_confusion_matrix", True) else None
    with report.timed("eval"):
      result = evaluate.evaluate_all(p_eval_step, _eval_variables(state), config, mesh, confusions=confusions,
                                     num_classes=meta["num_classes"])
    evaluate.write_eval_metrics(writer, step, result)
    if best_manager is not None:  # saved with the eval's metrics; Orbax keeps the best
      checkpoint.save_best(best_manager, step, model=state.model_item(), meta=meta, metrics=result)
    if confusions:
      evaluate.write_confusion(workdir, confusions, meta["class_names"], step=step, **evaluate.report_info(config))
    last_eval_step = step

  # Compiled before the input pipeline starts: on a CPU, 'auto' then times the layers of both steps together on
  # a machine that is not also decoding images (the loop's calls reuse these traces and executables); the eval
  # step's only where this run evaluates enough images to repay it.
  def trace_steps():
    traced = [p_train_step.trace(state, input_pipeline.train_batch_spec(config, mesh))]
    if _evaluates(d, step):
      with cpu.autotune.timed_if_it_pays(images=_eval_images(config, d, step, num_eval_examples)):
        traced.append(evaluate.trace_ahead(p_eval_step, _eval_variables(state), config, mesh))
    return traced
  _compile_side_by_side(cpu.autotune.measure_layers(trace_steps))
  train_iter = input_pipeline.create_train_iterator(config, mesh, start_step=step)
  t0, t0_step = time.monotonic(), step
  with _preemption_watch() as should_stop:
    try:
      while step < d.stop_after_steps:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, step_metrics = p_train_step(state, next(train_iter))
        step += 1
        metrics.add(step, step_metrics)
        for hook in hooks:
          hook(step)
        preempted = should_stop(step)
        is_last = step == d.stop_after_steps
        log_now = step % config.log_every_steps == 0 or is_last
        eval_now = (d.eval_every_steps and step % d.eval_every_steps == 0) or step == d.num_train_steps
        save_now = step % config.checkpoint_every_steps == 0 or is_last or preempted
        if log_now or eval_now or save_now:
          metrics.flush()  # raises on a non-finite loss before anything is written or saved
        if log_now:
          elapsed = time.monotonic() - t0
          summary = metrics.summary()
          summary["images_per_sec"] = (step - t0_step) * config.batch_size / max(elapsed, 1e-9)
          writer.write_scalars(step, summary)
          t0, t0_step = time.monotonic(), step
        if eval_now:
          run_eval(final=step == d.num_train_steps)
        if save_now:
          save()
        if preempted:
          logging.warning("Preemption signal: saved a checkpoint at step %d in %s; exiting.", step, ckpt_dir)
          return None
    except _NonFinite as e:
      manager.wait_until_finished()
      good = manager.latest_step()
      kept = f"the last good checkpoint is step {good} in {ckpt_dir}" if good is not None else "no checkpoint saved"
      what = "loss" if e.name == "loss" else "the weights' norm"
      raise TrainingError(f"{what} became {e.value} at step {e.step}; training stopped ({kept})") from None

  if config.profile and jax.process_index() == 0:
    _stop_profiler()  # the run ended inside the profiled window
  if step < d.num_train_steps:  # time-sliced run (stop_after_steps): the next run resumes here
    logging.info("Stopped at step %d of %d (config.stop_after_steps).", step, d.num_train_steps)
    return None
  if last_eval_step != step:  # resumed at the end, or the final eval already ran in the loop
    run_eval(final=True)
  print(evaluate.result_line(step, result), flush=True)
  return {"step": step, **result}


def _compile_side_by_side(traced) -> None:
  """Compiles jax.stages.Traced steps in parallel threads: XLA compiles without the GIL, so on a CPU host the
  eval step's compile hides behind the train step's."""
  with concurrent.futures.ThreadPoolExecutor(len(traced)) as pool:
    list(pool.map(lambda t: t.lower().compile(), traced))


def _evaluates(d, step: int) -> bool:
  """Whether this run, from `step` to d.stop_after_steps, evaluates (periodically, or at the end of training)."""
  return _evals_in_run(d, step) > 0


def _evals_in_run(d, step: int) -> int:
  """The evaluations this run makes from `step` to d.stop_after_steps: the periodic ones, and the final one
  where no periodic one falls on the last step (or the run resumed there)."""
  every, stop = d.eval_every_steps, d.stop_after_steps
  evals = stop // every - step // every if every else 0
  final = stop == d.num_train_steps and (not every or stop % every or step == stop)
  return evals + int(bool(final))


def _eval_images(config, d, step: int, num_eval_examples: int) -> int:
  """Images the eval step runs on from `step` to the end of this run (padding and flip TTA included): what
  'auto' weighs timing its layers against (cpu/autotune.py, timed_if_it_pays)."""
  batches = math.ceil(num_eval_examples / config.eval_batch_size)
  return (_evals_in_run(d, step) * batches * config.eval_batch_size
          * (2 if config.get("eval_flip_tta", False) else 1))


def _stop_profiler():
  try:
    jax.profiler.stop_trace()
  except RuntimeError:  # no trace running: the hook already stopped it
    pass


def _eval_variables(state: TrainState) -> dict:
  return checkpoint.inference_variables(state.model_item())
