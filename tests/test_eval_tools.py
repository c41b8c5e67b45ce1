"""Evaluation tools (issue 15): confusion matrix and per-class accuracy, keep-best checkpoints, flip TTA, and
evaluation at another resolution, each checked against an independent computation (model.apply and numpy).

One short digits run (tiny model at 8x8, 30 steps, an eval every 5 steps, resumed once at step 15) is shared by
the tests that need a trained checkpoint.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from conftest import tiny_config
from resnext_jax import checkpoint
from resnext_jax import evaluate
from resnext_jax import input_pipeline
from resnext_jax import models
from resnext_jax import plots
from resnext_jax import predict
from resnext_jax import runtime
from resnext_jax import train
from resnext_jax.errors import CheckpointError, ConfigError

NUM_TEST = 299
EVAL_EVERY = 5


def _digits_config(digits_dir, **overrides):
  base = dict(dataset="sklearn_digits", data_dir=digits_dir, image_size=8, batch_size=64, num_train_steps=30,
              learning_rate=0.1, warmup_steps=2, nesterov=True, log_every_steps=5, eval_batch_size=64,
              eval_every_steps=EVAL_EVERY, checkpoint_every_steps=10, keep_checkpoints=1, keep_best_checkpoints=2,
              shuffle_buffer_size=2048)
  base.update(overrides)
  return tiny_config(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_dir):
  """(config, workdir, final result): stopped at step 15 (config.stop_after_steps), then resumed to 30."""
  workdir = str(tmp_path_factory.mktemp("eval_tools") / "wd")
  assert train.train_and_evaluate(_digits_config(digits_dir, stop_after_steps=15), workdir) is None
  config = _digits_config(digits_dir)
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 30 and result["num_examples"] == NUM_TEST, result
  return config, workdir, result


def _test_split(config):
  """Each test image preprocessed alone by the eval transform at `config`'s image size, and the labels."""
  builder = tfds.builder("sklearn_digits", data_dir=config.data_dir)
  examples = list(tfds.as_numpy(builder.as_dataset(split="test", decoders={"image": tfds.decode.SkipDecoding()})))
  images = np.stack([input_pipeline.preprocess_eval_image(e["image"], config) for e in examples])
  return images, np.asarray([int(e["label"]) for e in examples]), [e["image"] for e in examples]


def _logits(model, variables, images):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images)),
                    np.float64)


def _reference(logits, labels):
  """top-1, mean cross-entropy and the confusion matrix, in numpy from the logits."""
  pred = logits.argmax(axis=1)
  matrix = np.zeros((10, 10), np.int64)
  for t, p in zip(labels, pred):
    matrix[t, p] += 1
  shifted = logits - logits.max(axis=1, keepdims=True)
  loss = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels]
  return {"top1": float(np.mean(pred == labels)), "loss": float(loss.mean()), "matrix": matrix}


def _eval_steps(workdir):
  """{step: eval top-1} from the training run's TensorBoard events (the last write of a step wins)."""
  series = plots.read_scalars(workdir)
  return {step: value for step, value in series["eval_top1"]}


# --- Confusion matrix and per-class accuracy. ---


def test_confusion_matrix_and_per_class_accuracy_equal_numpy(trained, capsys):
  """The JSON written by the final eval of training and by --mode=eval: the matrix equals numpy's count of
  (label, argmax of model.apply's logits) over the 299 test images, each preprocessed alone; per-class accuracy
  is its diagonal over its row sums, which are the label counts. A padded row counted, or rows and columns
  swapped, would differ (the matrix is not symmetric)."""
  config, workdir, result = trained
  model, variables, step, _ = checkpoint.load_variables(config, workdir, runtime.make_mesh(), (8, 8, 3))
  images, labels, _ = _test_split(config)
  want = _reference(_logits(model, {k: variables[k] for k in ("params", "batch_stats")}, images), labels)
  assert not np.array_equal(want["matrix"], want["matrix"].T)  # a transposed matrix would be caught
  assert 0.3 < want["top1"] < 1.0, want  # a trained model that still makes mistakes: off-diagonal entries

  train_report = json.loads(open(os.path.join(workdir, "confusion_matrix.json")).read())
  got = evaluate.evaluate(config, workdir)
  capsys.readouterr()
  eval_report = json.loads(open(os.path.join(workdir, "eval", "confusion_matrix.json")).read())
  for report in (train_report, eval_report):
    matrix = np.asarray(report["confusion_matrix"])
    np.testing.assert_array_equal(matrix, want["matrix"])
    assert report["step"] == step == 30
    assert report["class_names"] == [str(d) for d in range(10)]
    assert report["counts"] == np.bincount(labels, minlength=10).tolist()
    assert report["correct"] == np.diag(want["matrix"]).tolist()
    assert report["per_class_accuracy"] == pytest.approx(
        (np.diag(want["matrix"]) / np.bincount(labels, minlength=10)).tolist())
    assert report["predicted_counts"] == want["matrix"].sum(axis=0).tolist()
    assert report["num_examples"] == NUM_TEST and report["top1"] == pytest.approx(want["top1"])
    assert report["eval_image_size"] == 8 and report["flip_tta"] is False
  assert train_report["checkpoint"] == eval_report["checkpoint"] == "latest"
  assert got["top1"] == result["top1"] == pytest.approx(want["top1"])
  for png in (os.path.join(workdir, "confusion_matrix.png"), os.path.join(workdir, "eval", "confusion_matrix.png")):
    with Image.open(png) as image:
      assert image.format == "PNG" and image.size[0] > 500


def test_confusion_summary_and_plot_for_many_classes(tmp_path):
  """A class without examples has accuracy None (not a division by zero); 1000 classes plot as an image."""
  matrix = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 5]])
  summary = evaluate.confusion_summary(matrix, ["a", "b", "c"], step=7)
  assert summary["per_class_accuracy"] == [0.75, None, 5 / 7]
  assert summary["counts"] == [4, 0, 7] and summary["top1"] == 8 / 11 and summary["step"] == 7
  rng = np.random.default_rng(0)
  big = np.diag(rng.integers(0, 50, 1000)) + rng.integers(0, 2, (1000, 1000))
  plots.plot_confusion(big, [f"class {i}" for i in range(1000)], str(tmp_path / "big.png"), title="1000")
  with Image.open(tmp_path / "big.png") as image:
    assert image.format == "PNG"


# --- Keep-best checkpoints. ---


def test_keep_best_keeps_the_best_by_top1_beside_the_latest_across_a_resume(trained, capsys):
  """Evals at steps 5..30 (the run was stopped at 15 and resumed): checkpoints_best holds the two steps with
  the highest eval top-1 (ties: the later step, as Orbax's BestN sorts), each with its eval metrics and without
  optimizer state; checkpoints holds only the latest step. --mode=eval with eval_checkpoint='best' evaluates the
  best one and reproduces its recorded top-1."""
  config, workdir, _ = trained
  top1 = _eval_steps(workdir)
  assert sorted(top1) == list(range(EVAL_EVERY, 31, EVAL_EVERY)), top1
  want = sorted(sorted(top1, key=lambda s: (top1[s], s))[-2:])
  best_dir = checkpoint.best_checkpoint_directory(workdir)
  kept = sorted(int(name) for name in os.listdir(best_dir) if name.isdigit())
  assert kept == want, (kept, top1)
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == [30]
  for step in kept:
    items = set(os.listdir(os.path.join(best_dir, str(step))))
    assert {"model", "meta", "metrics"} <= items and "train" not in items, items

  best, metrics = checkpoint.best_step(best_dir)
  assert best == max(kept, key=lambda s: (top1[s], s))
  assert metrics["top1"] == pytest.approx(top1[best]) and metrics["num_examples"] == NUM_TEST
  config = _digits_config(config.data_dir, eval_checkpoint="best")
  got = evaluate.evaluate(config, workdir)
  capsys.readouterr()
  assert got["step"] == best and got["top1"] == metrics["top1"], (got, metrics)
  report = json.loads(open(os.path.join(workdir, "eval", "confusion_matrix.json")).read())
  assert report["checkpoint"] == "best" and report["step"] == best
  config.eval_checkpoint_step = min(kept)  # a given step among the kept ones
  assert evaluate.evaluate(config, workdir)["step"] == min(kept)
  config.eval_checkpoint_step = 3
  with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
    evaluate.evaluate(config, workdir)
  capsys.readouterr()


def test_best_checkpoint_missing_and_bad_settings_are_clear_errors(tmp_path):
  with pytest.raises(CheckpointError, match="keep_best_checkpoints"):
    evaluate.evaluate(tiny_config(eval_checkpoint="best"), str(tmp_path / "nothing"))
  for overrides, message in (({"eval_image_size": -1}, "eval_image_size"),
                             ({"best_checkpoint_metric": "loss"}, "best_checkpoint_metric"),
                             ({"best_checkpoint_metric": "ema_top1", "keep_best_checkpoints": 1}, "ema_decay"),
                             ({"eval_checkpoint": "newest"}, "eval_checkpoint"),
                             ({"keep_best_checkpoints": -1}, "keep_best_checkpoints")):
    with pytest.raises(ConfigError, match=message):
      train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "wd"))


# --- Flip test-time augmentation. ---


def _random_model():
  overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in tiny_config().model_overrides.items()}
  model = models.create_model("resnext11_4x16d", num_classes=10, **overrides)
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8, 8, 3)), train=False))(
      jax.random.key(3, impl="rbg"))
  variables = jax.tree_util.tree_map_with_path(  # spread the logits: no near-ties for argmax
      lambda path, v: v * 20 if "fc" in jax.tree_util.keystr(path) else v, variables)
  return model, variables


def test_flip_tta_is_the_mean_of_the_two_passes_logits():
  """eval_step with flip_tta: loss, top-1, top-5 and the predicted class are those of (logits(x) +
  logits(x mirrored left-right)) / 2, computed here by two model.apply calls on numpy-flipped images; the
  plain step differs on this batch, so a missing or wrong (vertical) flip would show."""
  model, variables = _random_model()
  rng = np.random.default_rng(0)
  images = rng.standard_normal((16, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  batch = {"image": images, "label": labels, "mask": np.ones(16, bool)}
  mean = (_logits(model, variables, images) + _logits(model, variables, images[:, :, ::-1].copy())) / 2
  want = _reference(mean, labels)
  rank = (mean > mean[np.arange(16), labels][:, None]).sum(axis=1)

  mesh = runtime.make_mesh()
  on_mesh = {k: runtime.from_host(v, mesh) for k, v in batch.items()}
  outputs = [evaluate.eval_step(variables, batch, model=model, flip_tta=True),
             evaluate.compile_eval_step(model, mesh, flip_tta=True)(variables, on_mesh)]
  for out in map(runtime.to_host, outputs):
    np.testing.assert_array_equal(out["pred"], mean.argmax(axis=1))
    np.testing.assert_array_equal(out["top1"], rank == 0)
    np.testing.assert_array_equal(out["top5"], rank < 5)
    np.testing.assert_array_equal(out["label"], labels)
    assert float(np.mean(out["loss"])) == pytest.approx(want["loss"], rel=1e-5)
  plain = runtime.to_host(evaluate.eval_step(variables, batch, model=model))
  assert float(np.mean(plain["loss"])) != pytest.approx(want["loss"], rel=1e-3)
  vertical = (_logits(model, variables, images) + _logits(model, variables, images[:, ::-1].copy())) / 2
  assert not np.allclose(vertical, mean)


def test_flip_tta_in_eval_mode(trained, capsys):
  """--mode=eval with eval_flip_tta: the whole test split, equal to numpy over the averaged logits."""
  config, workdir, _ = trained
  model, variables, _, _ = checkpoint.load_variables(config, workdir, runtime.make_mesh(), (8, 8, 3))
  plain = {k: variables[k] for k in ("params", "batch_stats")}
  images, labels, _ = _test_split(config)
  want = _reference((_logits(model, plain, images) + _logits(model, plain, images[:, :, ::-1].copy())) / 2, labels)
  got = evaluate.evaluate(_digits_config(config.data_dir, eval_flip_tta=True), workdir)
  capsys.readouterr()
  assert got["top1"] == pytest.approx(want["top1"]) and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
  report = json.loads(open(os.path.join(workdir, "eval", "confusion_matrix.json")).read())
  np.testing.assert_array_equal(report["confusion_matrix"], want["matrix"])
  assert report["flip_tta"] is True


# --- Evaluation at another resolution. ---


def test_eval_image_size_reaches_the_eval_step_and_the_transform(trained, tmp_path, capsys):
  """eval_image_size=12 for a model trained at 8: the eval batches are 12x12 and equal the eval transform at 12
  of each image alone; --mode=eval's figures equal model.apply on those 12x12 images; predict preprocesses at 12
  too. The checkpoint's meta keeps the training size."""
  config, workdir, _ = trained
  at12 = _digits_config(config.data_dir, eval_image_size=12)
  assert input_pipeline.eval_image_size(at12) == 12 and input_pipeline.eval_config(at12).image_size == 12
  assert input_pipeline.eval_config(config) is config and at12.image_size == 8  # the caller's config is unchanged
  images, labels, encoded = _test_split(input_pipeline.eval_config(at12))
  assert images.shape == (NUM_TEST, 12, 12, 3)

  mesh = runtime.make_mesh()
  model, variables, _, meta = checkpoint.load_variables(at12, workdir, mesh, (8, 8, 3))
  assert meta["image_size"] == 8
  plain = {k: variables[k] for k in ("params", "batch_stats")}
  seen = []
  p_eval_step = evaluate.compile_eval_step(model, mesh)

  def step(v, batch):
    seen.append(batch["image"].shape)
    return p_eval_step(v, batch)

  result = evaluate.evaluate_all(step, plain, at12, mesh)
  assert set(seen) == {(64, 12, 12, 3)} and len(seen) == 5, seen  # 299 = 4 x 64 + 43 (+ 21 padded)
  want = _reference(_logits(model, plain, images), labels)
  assert result["top1"] == pytest.approx(want["top1"]) and result["loss"] == pytest.approx(want["loss"], rel=1e-5)
  got = evaluate.evaluate(at12, workdir)
  assert got["top1"] == result["top1"] and got["loss"] == pytest.approx(result["loss"], rel=1e-9)
  at8 = evaluate.evaluate(config, workdir)
  assert at8["loss"] != pytest.approx(got["loss"], rel=1e-6)  # a different input size gives different logits
  report = json.loads(open(os.path.join(workdir, "eval", "confusion_matrix.json")).read())
  assert report["eval_image_size"] == 8  # the last eval mode run above was at 8

  # predict: the same 12x12 preprocessing.
  path = tmp_path / "digit.png"
  path.write_bytes(encoded[0])
  capsys.readouterr()
  assert predict.predict(at12, workdir, [str(path)]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  probs = jax.nn.softmax(_logits(model, plain, images[:1])[0])
  top = line["top_k"][0]
  assert top["label"] == int(np.argmax(probs)) and top["prob"] == pytest.approx(float(np.max(probs)), rel=1e-5)


def test_eval_image_size_on_synthetic_data():
  """The synthetic eval batches take the eval size too (no data needed)."""
  config = tiny_config(eval_image_size=16)
  mesh = runtime.make_mesh()
  batches = list(input_pipeline.create_eval_iterator(input_pipeline.eval_config(config), mesh))
  assert {b["image"].shape for b in batches} == {(16, 16, 16, 3)}
  assert sum(int(np.asarray(b["mask"]).sum()) for b in batches) == config.synthetic_num_examples
