"""In-process training, evaluation and prediction with a tiny grouped-conv ResNeXt on one CPU device.

Real components throughout: Orbax checkpoints on disk, TensorBoard event files, the TFDS digits pipeline.
"""

import glob
import json
import os
import types

import jax
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import tiny_config
from resnext_jax import checkpoint
from resnext_jax import errors
from resnext_jax import evaluate
from resnext_jax import models
from resnext_jax import optim
from resnext_jax import predict
from resnext_jax import runtime
from resnext_jax import train
from resnext_jax.errors import ConfigError


def _scalar_tags(logdir):
  tags = set()
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    tags |= set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
  return tags


def _last_line(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_recipe_features_train_eval_checkpoint(tmp_path, capsys):
  """EMA, bf16 compute, gradient accumulation, label smoothing, Nesterov, cosine warm-up, all in one short run."""
  workdir = str(tmp_path / "wd")
  config = tiny_config(ema_decay=0.5, half_precision=True, grad_accum_steps=2, label_smoothing=0.1,
                       nesterov=True, keep_checkpoints=3, log_every_steps=1, profile=True, profile_first_step=1,
                       profile_num_steps=1)
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 4 and result["num_examples"] == 48
  for key in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"):
    assert np.isfinite(result[key]), key
  assert _last_line(capsys) == result

  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
  step, meta = checkpoint.load_meta(ckpt_dir)
  assert step == 4 and meta["model"] == "resnext11_4x16d" and meta["num_classes"] == 10 and meta["ema"]
  assert meta["model_overrides"]["stage_sizes"] == [1, 1]
  # Parameters and BN statistics stay float32 under bfloat16 compute.
  _, variables, _, _ = checkpoint.load_variables(config, workdir, runtime.make_mesh(), (8, 8, 3))
  dtypes = {x.dtype for x in jax.tree.leaves(variables)}
  assert dtypes == {np.dtype("float32")}

  assert glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))  # the profiling hook
  tags = _scalar_tags(workdir)
  for tag in ("train_loss", "train_accuracy", "learning_rate", "images_per_sec", "steps_per_sec", "eval_top1",
              "eval_top5", "eval_loss", "eval_ema_top1"):
    assert tag in tags, (tag, tags)

  # Eval mode on the saved checkpoint: the same numbers, printed as the last stdout line, written as events.
  assert evaluate.evaluate(config, workdir) == result
  assert _last_line(capsys) == result
  assert "eval_top1" in _scalar_tags(os.path.join(workdir, "eval"))
  config.eval_checkpoint_step = 2
  assert evaluate.evaluate(config, workdir)["step"] == 2
  config.eval_checkpoint_step = 3
  with pytest.raises(errors.CheckpointError, match="no checkpoint for step 3"):
    evaluate.evaluate(config, workdir)


# Resumption: tests/test_resume.py (a shuffled dataset, where the restart position matters; a synthetic run
# repeats one batch and cannot tell).


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "wd")
  config = tiny_config(num_train_steps=6, stop_after_steps=2)
  train.train_and_evaluate(config, workdir)
  blown = tiny_config(num_train_steps=6, checkpoint_every_steps=1, learning_rate=1e38)  # diverges at once
  with pytest.raises(errors.TrainingError, match=r"became (nan|inf) at step 3.*last good checkpoint is step 2"):
    train.train_and_evaluate(blown, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["2"]
  _, variables, step, _ = checkpoint.load_variables(config, workdir, runtime.make_mesh(), (8, 8, 3))
  assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="unknown model 'resnext9000'"):
    train.train_and_evaluate(tiny_config(model="resnext9000"), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match=r"batch_size=15 must be divisible by the number of devices \(1\) x "
                                        r"grad_accum_steps \(2\)"):
    train.train_and_evaluate(tiny_config(batch_size=15, grad_accum_steps=2), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="lr_schedule"):
    train.train_and_evaluate(tiny_config(lr_schedule="poly"), str(tmp_path / "c"))


def test_missing_and_damaged_checkpoints_name_the_path(tmp_path):
  config = tiny_config()
  missing = str(tmp_path / "nothing_here")
  with pytest.raises(errors.CheckpointError, match="nothing_here"):
    evaluate.evaluate(config, missing)
  # A step directory whose files are garbage (e.g. a truncated copy).
  damaged = tmp_path / "damaged" / "checkpoints" / "7"
  for item in ("model", "meta"):
    (damaged / item).mkdir(parents=True)
    (damaged / item / "garbage").write_bytes(b"\x00not a checkpoint")
  with pytest.raises(errors.CheckpointError, match=str(tmp_path / "damaged")):
    evaluate.evaluate(config, str(tmp_path / "damaged"))


def _write_images(directory):
  rng = np.random.default_rng(0)
  paths = []
  for i, fmt in enumerate(("png", "jpeg")):
    path = os.path.join(directory, f"img{i}.{fmt}")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  bad = os.path.join(directory, "notes.txt")
  with open(bad, "w") as f:
    f.write("not an image")
  return paths, bad


def test_digits_train_eval_predict(tmp_path, digits_dir, capsys, monkeypatch):
  """The real digits pipeline end to end: train, eval on all 299 test images once, predict files.

  The steps are traced once: compiled ahead of the pipeline (train_batch_spec, eval_batch_spec), reused by the
  loop's calls."""
  traces = []
  step, eval_step = train.train_step, evaluate.eval_step
  monkeypatch.setattr(train, "train_step", lambda *a, **k: traces.append("train") or step(*a, **k))
  monkeypatch.setattr(evaluate, "eval_step", lambda *a, **k: traces.append("eval") or eval_step(*a, **k))
  workdir = str(tmp_path / "wd")
  config = tiny_config(dataset="sklearn_digits", data_dir=digits_dir, num_train_steps=3, batch_size=32,
                       eval_batch_size=64, image_size=16)
  result = train.train_and_evaluate(config, workdir)
  assert result["num_examples"] == 299 and result["step"] == 3
  assert sorted(traces) == ["eval", "train"], f"steps traced: {traces}"
  capsys.readouterr()

  paths, bad = _write_images(str(tmp_path))
  failed = predict.predict(config, workdir, [paths[0], bad, paths[1], str(tmp_path / "missing.png")])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert failed == 2 and [line["file"] for line in lines] == [paths[0], bad, paths[1],
                                                              str(tmp_path / "missing.png")]
  assert "error" in lines[1] and "error" in lines[3]
  for line in (lines[0], lines[2]):
    top = line["top_k"]
    assert len(top) == 5 and [t["name"] for t in top] == [str(t["label"]) for t in top]
    assert top[0]["prob"] >= top[-1]["prob"] and 0 < sum(t["prob"] for t in top) <= 1 + 1e-6


def test_measuring_layers_traces_each_step_twice_then_never_again(tmp_path, digits_dir, monkeypatch):
  """With 'auto' measuring (a fresh choices file), the job traces both steps once dry, times the layers they
  meet together (the eval step's where its evals repay it), and traces them once more with the measured
  choices; the loop and its evals reuse those."""
  from resnext_jax.cpu import autotune  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("RESNEXT_JAX_AUTOTUNE", "on")
  monkeypatch.setattr(autotune, "cache_path", lambda: str(tmp_path / "choices.json"))
  monkeypatch.setattr(autotune, "_memory", {})
  traces = []
  step, eval_step = train.train_step, evaluate.eval_step
  monkeypatch.setattr(train, "train_step", lambda *a, **k: traces.append("train") or step(*a, **k))
  monkeypatch.setattr(evaluate, "eval_step", lambda *a, **k: traces.append("eval") or eval_step(*a, **k))
  config = tiny_config(dataset="sklearn_digits", data_dir=digits_dir, num_train_steps=4, batch_size=32,
                       eval_batch_size=64, image_size=16, eval_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert traces == ["train", "eval"] * 2, f"steps traced: {traces}"
  choices = json.loads((tmp_path / "choices.json").read_text())
  assert any(" fwd+bwd " in k and not k.startswith(autotune.UNTIMED) for k in choices), choices
  # Two evals of 320 images (299, padded): too few to repay timing the eval step's layers (autotune._pays_off).
  assert any(k.startswith(f"{autotune.UNTIMED}640 images ") and " fwd " in k for k in choices), choices


def test_converted_checkpoint_eval_and_predict(tmp_path, digits_dir, capsys):
  """A converted (torchvision-style) checkpoint: 'model' and 'meta' only, at step 0, no training state."""
  config = tiny_config(dataset="sklearn_digits", data_dir=digits_dir, image_size=16, eval_batch_size=64)
  model = models.create_model("resnext11_4x16d", num_classes=10, stage_sizes=(1, 1), planes=(8, 16),
                              stem_width=8, base_width=32)
  variables = model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32))
  converted = str(tmp_path / "converted")
  manager = checkpoint.create_manager(converted, async_save=False)
  checkpoint.save(manager, 0, model=dict(variables),
                  meta=dict(model="resnext11_4x16d", num_classes=10, source="test",
                            model_overrides=dict(stage_sizes=[1, 1], planes=[8, 16], stem_width=8, base_width=32)))
  manager.close()

  direct = evaluate.evaluate(config, converted)  # --workdir pointing at the converted directory
  assert direct["step"] == 0 and direct["num_examples"] == 299
  config.init_checkpoint = converted  # ... or named by the config, with an empty workdir
  assert evaluate.evaluate(config, str(tmp_path / "fresh")) == direct
  capsys.readouterr()
  paths, _ = _write_images(str(tmp_path))
  assert predict.predict(config, str(tmp_path / "fresh"), paths) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2

  # Fine-tuning from it on 7 classes: every parameter but the new head starts from the checkpoint.
  finetune = tiny_config(init_checkpoint=converted, synthetic_num_classes=7, image_size=16, num_train_steps=1,
                         learning_rate=0.0, checkpoint_every_steps=1)
  train.train_and_evaluate(finetune, str(tmp_path / "finetuned"))
  _, tuned, _, meta = checkpoint.load_variables(finetune, str(tmp_path / "finetuned"), runtime.make_mesh(),
                                              (16, 16, 3))
  assert meta["num_classes"] == 7 and tuned["params"]["fc"]["kernel"].shape == (64, 7)
  del tuned["params"]["fc"], variables["params"]["fc"]
  jax.tree.map(np.testing.assert_array_equal, tuned["params"], variables["params"])


def test_the_initial_state_is_the_same_draw_whatever_the_compile_options(monkeypatch):
  """create_train_state compiles its initialiser cheaply (cpu.run_once_options): the weights are the draw the
  steps' options give, to a few float32 ulps (products unfused with their sums), and the same bits every time."""
  config = tiny_config()
  model = models.from_config(config, 10)
  schedule = optim.learning_rate_schedule(config, optim.durations(config, config.synthetic_num_examples))
  tx = optim.create_optimizer(config, schedule)
  mesh = runtime.make_mesh()
  cheap, _ = train.create_train_state(config, model, tx, mesh, (8, 8, 3))
  again, _ = train.create_train_state(config, model, tx, mesh, (8, 8, 3))
  monkeypatch.setattr(train.cpu, "run_once_options", train.cpu.compiler_options)
  full, _ = train.create_train_state(config, model, tx, mesh, (8, 8, 3))
  for a, b, c in zip(jax.tree.leaves(cheap), jax.tree.leaves(again), jax.tree.leaves(full)):
    a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
    np.testing.assert_array_equal(a, b)
    if a.dtype == np.float32:
      np.testing.assert_array_max_ulp(a, c, maxulp=4)
    else:
      np.testing.assert_array_equal(a, c)
  monkeypatch.setattr(train.cpu, "run_once_options", lambda: {"xla_backend_optimization_level": "NOT_AN_INT"})
  with pytest.raises(Exception, match="xla_backend_optimization_level"):  # the initialiser takes them
    train.create_train_state(config, model, tx, mesh, (8, 8, 3))


def test_imagenet_class_names():
  names = predict.class_names({"num_classes": 1000, "model": "resnext50_32x4d"}, tiny_config())
  assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"


@pytest.mark.parametrize("every,stop,step,evaluates", [
    (0, 10, 0, True),    # the final evaluation
    (0, 5, 0, False),    # a time slice that ends before any evaluation
    (4, 5, 0, True),     # ... that passes step 4's
    (4, 7, 4, False),    # resumed at 4: the next one, at 8, is past the slice
    (4, 10, 10, True)])  # resumed at the end: the final evaluation runs again
def test_the_eval_step_is_compiled_ahead_only_for_runs_that_evaluate(every, stop, step, evaluates):
  d = types.SimpleNamespace(num_train_steps=10, eval_every_steps=every, stop_after_steps=stop)
  assert train._evaluates(d, step) == evaluates  # pylint: disable=protected-access


@pytest.mark.parametrize("every, stop, step, flip_tta, evals", [
    (115, 345, 0, False, 3),    # the digits demo: evals at 115, 230 and 345 (the last is the final one)
    (100, 345, 0, False, 4),    # 100, 200, 300, and the final eval at 345
    (0, 345, 0, False, 1),      # the final eval only
    (115, 345, 345, False, 1),  # resumed at the end: the final eval runs again
    (115, 200, 0, False, 1),    # a time-sliced run to step 200: the eval at 115, no final eval
    (115, 345, 0, True, 6),     # flip TTA: two forward passes per image
])
def test_eval_images_counts_what_the_run_evaluates(every, stop, step, flip_tta, evals):
  """What 'auto' weighs timing the eval step's layers against: every eval this run makes, padded batches."""
  from resnext_jax import optim  # pylint: disable=g-import-not-at-top
  d = optim.Durations(steps_per_epoch=23, num_train_steps=345, warmup_steps=23, lr_boundaries=(),
                      eval_every_steps=every, stop_after_steps=stop)
  config = tiny_config(eval_batch_size=320, eval_flip_tta=flip_tta)
  assert train._eval_images(config, d, step, num_eval_examples=299) == evals * 320  # pylint: disable=protected-access
