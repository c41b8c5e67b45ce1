"""Every shipped recipe loads and validates without data, and the digits version of the "ResNet strikes back" A3
recipe trains end to end (slow) to at least the plain digits recipe's top-1."""

import importlib
import os
import pkgutil

import jax
import jax.numpy as jnp
import pytest

from conftest import last_json, run_main
from resnext_jax import configs as configs_package
from resnext_jax import evaluate
from resnext_jax import input_pipeline
from resnext_jax import models
from resnext_jax import optim
from resnext_jax import runtime
from resnext_jax import train
from resnext_jax.configs import default

# Classes and train-split sizes of each dataset, so that nothing is read or prepared.
DATASETS = {"imagenet2012": (1000, 1_281_167), "cifar10": (10, 50_000), "cifar100": (100, 50_000),
            "sklearn_digits": (10, 1_498), "imagefolder": (5, 3_670), "synthetic": (10, 1_000)}


def _recipes():
  names = sorted(m.name for m in pkgutil.iter_modules(configs_package.__path__) if m.name != "default")
  out = []
  for name in names:
    out.append((name, None))
    if name == "digits_resnext":
      out.append((name, "tiny"))
  return out


def _load(name, variant):
  module = importlib.import_module(f"resnext_jax.configs.{name}")
  return module.get_config(variant) if variant else module.get_config()


def test_the_recipe_list_holds_the_new_recipes():
  names = {name for name, _ in _recipes()}
  assert {"imagenet_resnext50_rsb_a1", "imagenet_resnext50_rsb_a2", "imagenet_resnext50_rsb_a3",
          "imagenet_resnext50_tv_v2", "digits_resnext_rsb_a3", "digits_resnext", "imagenet_resnext50"} <= names


@pytest.mark.parametrize("name,variant", _recipes())
def test_every_recipe_loads_and_validates(name, variant):
  """Each get_config(): only keys that configs/default.py defines (a misspelt or unimplemented option would be
  silently ignored), the training checks pass on one device, the model is built (abstractly, no FLOPs) and the
  optimizer initialises on its parameters; RandAugment / TrivialAugment strings parse."""
  config = _load(name, variant)
  unknown = set(config.keys()) - set(default.get_config().keys())
  assert not unknown, f"{name}: keys not in default.py: {sorted(unknown)}"
  num_classes, num_train = DATASETS[config.dataset]
  mesh = runtime.make_mesh(jax.devices()[:1])
  train.check_config(config, mesh)
  config.conv_impl = "xla"  # the recipe is checked here, not the CPU kernels
  evaluate.check_eval_config(config)
  optim.check_loss_config(config)
  model = models.from_config(config, num_classes)
  size = input_pipeline.eval_image_size(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, config.image_size,
                                                                           config.image_size, 3)), train=False))
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3)), train=False), shapes)
  assert logits.shape == (2, num_classes)
  d = optim.durations(config, num_train)
  assert d.num_train_steps > 0
  tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, d))
  jax.eval_shape(tx.init, shapes["params"])
  from resnext_jax.datasets import augment  # pylint: disable=g-import-not-at-top (the issue-15 augmentations)
  augment.check_config(config)
  assert config.batch_size % augment.aug_repeats(config) == 0  # an image's copies share a batch
  assert (augment.auto_augment_policy(config) is not None) == bool(config.get("auto_augment", ""))


def test_rsb_recipes_follow_table_1():
  """The columns of Table 1 (arXiv:2110.00476) that differ between A1, A2 and A3, and what they share."""
  # image size, eval size, epochs, lr, weight decay, label smoothing, drop path, repeats (1: off), RandAugment, Mixup
  want = {"imagenet_resnext50_rsb_a1": (224, 224, 600, 5e-3, 0.01, 0.1, 0.05, 3, "rand-m7-mstd0.5-inc1", 0.2),
          "imagenet_resnext50_rsb_a2": (224, 224, 300, 5e-3, 0.02, 0.0, 0.05, 3, "rand-m7-mstd0.5-inc1", 0.1),
          "imagenet_resnext50_rsb_a3": (160, 224, 100, 8e-3, 0.02, 0.0, 0.0, 1, "rand-m6-mstd0.5-inc1", 0.1)}
  for name, row in want.items():
    c = _load(name, None)
    got = (c.image_size, input_pipeline.eval_image_size(c), c.num_epochs, c.learning_rate, c.weight_decay,
           c.label_smoothing, c.drop_path_rate, c.aug_repeats, c.auto_augment, c.mixup_alpha)
    assert got == row, name
    assert (c.lr_base_batch_size, c.optimizer, c.loss, c.bce_target_threshold, c.cutmix_alpha, c.crop_ratio,
            c.warmup_epochs, c.lr_schedule, c.reprob, c.ema_decay, c.grad_clip_norm) == (
                2048, "lamb", "bce", 0.2, 1.0, 0.95, 5.0, "cosine", 0.0, 0.0, 1.0), name
    # Batch 2048, or 2040 where 3 repeats must divide it; the learning rate scaled from 2048.
    assert c.batch_size == (2040 if row[7] > 1 else 2048), name
    assert optim.peak_learning_rate(c) == pytest.approx(row[3] * c.batch_size / 2048)


def test_torchvision_v2_recipe():
  c = _load("imagenet_resnext50_tv_v2", None)
  eval_size = input_pipeline.eval_image_size(c)
  assert (c.image_size, eval_size, round(eval_size / c.crop_ratio)) == (
      176, 224, 232)  # train crop 176, val resize 232, val crop 224
  assert c.antialias  # torchvision's own eval transform (transforms.torchvision_eval_pixels)
  assert optim.peak_learning_rate(c) == 0.5 and c.batch_size == 1024 and c.optimizer == "sgd"
  assert (c.auto_augment, c.reprob, c.aug_repeats, c.label_smoothing, c.mixup_alpha, c.cutmix_alpha) == (
      "trivial", 0.1, 4, 0.1, 0.2, 1.0)
  assert c.weight_decay == 2e-5 and not c.weight_decay_bn_and_bias and c.num_epochs == 600
  # torchvision's EMA: decay 0.99998 adjusted for batch 1024, every 32 steps over 600 epochs, per step here.
  per_update = 1 - (1 - 0.99998) * 1024 * 32 / 600
  assert c.ema_decay == pytest.approx(per_update ** (1 / 32), abs=1e-8)


@pytest.mark.slow
def test_digits_rsb_a3_reaches_the_plain_recipes_top1(tmp_path, digits_dir):
  """Both digits recipes through main.py from scratch: the A3-style one (LAMB, BCE, Mixup/CutMix, RandAugment,
  60 epochs) must reach at least the plain one's test top-1 (SGD, 15 epochs, no augmentation)."""
  results = {}
  for name in ("digits_resnext", "digits_resnext_rsb_a3"):
    proc = run_main([f"--config=configs/{name}.py", f"--config.data_dir={digits_dir}",
                     f"--workdir={tmp_path / name}"], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[name] = last_json(proc.stdout)
    assert results[name]["num_examples"] == 299, results[name]
  plain, a3 = results["digits_resnext"], results["digits_resnext_rsb_a3"]
  print(f"\ndigits test top-1: plain {plain['top1']:.4f} ({round(plain['top1'] * 299)}/299), "
        f"A3-style {a3['top1']:.4f} ({round(a3['top1'] * 299)}/299)")
  assert a3["top1"] >= plain["top1"], (plain, a3)
  assert os.path.isdir(tmp_path / "digits_resnext_rsb_a3" / "checkpoints_best")
  assert os.path.isfile(tmp_path / "digits_resnext_rsb_a3" / "confusion_matrix.png")
