"""Numbers that must be right, not just present: training on the digits learns, and the eval job's top-1, top-5
and loss equal an independent computation (model.apply and numpy over the test split), for any eval batch size."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import assert_same_eval, tiny_config
from resnext_jax import checkpoint
from resnext_jax import evaluate
from resnext_jax import input_pipeline
from resnext_jax import models
from resnext_jax import runtime
from resnext_jax import train

NUM_TEST = 299


def _train_losses(workdir):
  """[(step, mean train loss since the previous log)] from the run's TensorBoard events."""
  points = []
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    if "train_loss" in acc.Tags()["tensors"]:
      points += [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors("train_loss")]
  return sorted(points)


def test_training_on_digits_learns(tmp_path, digits_dir, capsys):
  """30 steps of batch 64 (1.3 epochs) with the tiny model at 8x8: the train loss falls from ~ln(10) to less than
  0.6x that and test top-1 ends far above chance (10 %). Observed: 2.33 -> 1.08, top-1 0.78. A wrong update
  sign, a learning rate of zero or labels shuffled against images would leave both near chance."""
  workdir = str(tmp_path / "wd")
  config = tiny_config(dataset="sklearn_digits", data_dir=digits_dir, image_size=8, batch_size=64,
                       num_train_steps=30, learning_rate=0.1, warmup_steps=2, nesterov=True, log_every_steps=5,
                       eval_batch_size=320, checkpoint_every_steps=1000, shuffle_buffer_size=2048)
  result = train.train_and_evaluate(config, workdir)
  capsys.readouterr()
  losses = _train_losses(workdir)
  assert [step for step, _ in losses] == [5, 10, 15, 20, 25, 30], losses
  first, last = losses[0][1], losses[-1][1]
  assert 1.8 < first < 3.0, losses      # about ln(10) = 2.30 at the start
  assert last < 0.6 * first, losses
  assert result["num_examples"] == NUM_TEST and result["top1"] > 0.5, result


def _reference(model, variables, config, data_dir):
  """top-1, top-5 and mean cross-entropy over the whole test split: each image preprocessed alone (the eval
  transform, no batching, no padding), one model.apply over all of them, the metrics in float64 numpy."""
  builder = tfds.builder("sklearn_digits", data_dir=data_dir)
  examples = tfds.as_numpy(builder.as_dataset(split="test", decoders={"image": tfds.decode.SkipDecoding()}))
  images, labels = [], []
  for example in examples:
    images.append(input_pipeline.preprocess_eval_image(example["image"], config))
    labels.append(int(example["label"]))
  labels = np.asarray(labels)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  logits = np.asarray(apply(variables, jnp.asarray(np.stack(images))), np.float64)
  true = logits[np.arange(len(labels)), labels]
  shifted = logits - logits.max(axis=1, keepdims=True)
  loss = np.log(np.exp(shifted).sum(axis=1)) - (true - logits.max(axis=1))
  rank = (logits > true[:, None]).sum(axis=1)  # classes scored above the true one
  return {"top1": float(np.mean(rank == 0)), "top5": float(np.mean(rank < 5)), "loss": float(loss.mean()),
          "num_examples": len(labels)}


def _padding_rows_score_their_label(model, variables, config):
  """`variables` with the fc bias of the padded rows' label raised until those rows are top-1 hits, so that hits
  counted on padded rows (not only padded rows counted as examples) change top-1 and top-5."""
  config = config.copy_and_resolve_references()
  config.eval_batch_size = 512  # one batch: 299 examples and 213 padded rows
  batch = next(iter(input_pipeline.create_eval_iterator(config, runtime.make_mesh())))
  mask, labels = np.asarray(batch["mask"]), np.asarray(batch["label"])
  padded, label = np.asarray(batch["image"])[~mask][:1], int(labels[~mask][0])
  logits = np.asarray(model.apply(variables, jnp.asarray(padded), train=False))[0]
  variables = jax.tree.map(lambda v: v, variables)  # a copy
  bias = np.asarray(variables["params"]["fc"]["bias"]).copy()
  bias[label] += logits.max() - logits[label] + 1.0
  variables["params"]["fc"]["bias"] = jnp.asarray(bias)
  assert np.argmax(np.asarray(model.apply(variables, jnp.asarray(padded), train=False))[0]) == label
  return variables


def test_eval_equals_an_independent_computation_for_any_batch_size(tmp_path, digits_dir, capsys):
  """Batches of 7 (42 full + 5 real and 2 padded rows), 64 (21 padded rows), 512 (213 padded rows): the same
  counts as model.apply and numpy over the 299 test images; padded rows counted as examples or their hits counted
  (the padded rows are made top-1 hits of their label, see below), or top-1 and top-5 swapped, would differ."""
  overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in tiny_config().model_overrides.items()}
  model = models.create_model("resnext11_4x16d", num_classes=10, **overrides)
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8, 8, 3)), train=False))(
      jax.random.key(7, impl="rbg"))
  # A wide spread of logits (no near-ties for rounding to flip) and BN statistics other than the initial (0, 1).
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 20 if "fc" in jax.tree_util.keystr(path) else v, variables)
  variables["batch_stats"] = jax.tree.map(lambda v: v + 0.1, variables["batch_stats"])
  config = tiny_config(dataset="sklearn_digits", data_dir=digits_dir, image_size=8)
  variables = _padding_rows_score_their_label(model, variables, config)
  ckpt = str(tmp_path / "ckpt")
  manager = checkpoint.create_manager(ckpt, async_save=False)
  checkpoint.save(manager, 0, model=dict(variables),
                  meta=dict(model="resnext11_4x16d", num_classes=10, source="test",
                            model_overrides={k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}))
  manager.close()

  want = _reference(model, variables, config, digits_dir)
  assert want["num_examples"] == NUM_TEST and want["top1"] < want["top5"] < 1.0, want  # swaps would show
  results = {}
  for batch_size in (7, 64, 512):
    config.eval_batch_size = batch_size
    results[batch_size] = got = evaluate.evaluate(config, ckpt)
    assert got["step"] == 0
    assert {k: got[k] for k in ("top1", "top5", "num_examples")} == {k: want[k] for k in ("top1", "top5",
                                                                                            "num_examples")}, (
        batch_size, got, want)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (batch_size, got, want)
  assert_same_eval(results[7], results[64])
  assert_same_eval(results[7], results[512])
  capsys.readouterr()
