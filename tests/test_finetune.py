"""Fine-tuning end to end: a checkpoint (converted layout), a new head, frozen early stages, a real image folder."""

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from resnext_jax import checkpoint, models, runtime, train

ARCH = dict(stage_sizes=[1, 1], planes=[8, 16], stem_width=8, base_width=32)
CLASSES = ("circle", "square", "stripes")


def write_image_folder(root, per_class):
  """root/{train,val}/<label>/*.png|jpg: real files of three visually distinct classes."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:24, :24]
  shapes = {"circle": (yy - 12) ** 2 + (xx - 12) ** 2 < 64, "square": (abs(yy - 12) < 7) & (abs(xx - 12) < 7),
            "stripes": (xx // 3) % 2 == 0}
  for split, n in (("train", per_class), ("val", 3)):
    for label in CLASSES:
      (root / split / label).mkdir(parents=True)
      for i in range(n):
        pixels = (shapes[label][..., None] * rng.integers(120, 256, 3) + rng.integers(0, 40, (24, 24, 3)))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            root / split / label / f"{i}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 10-class checkpoint in the layout the torchvision converter writes (model + meta, step 0)."""
  directory = tmp_path_factory.mktemp("pretrained")
  model = models.create_model("resnext11_4x16d", num_classes=10,
                              **{k: tuple(v) if isinstance(v, list) else v for k, v in ARCH.items()})
  variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), np.zeros((1, 16, 16, 3), np.float32))
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda s: s + 0.25, variables["batch_stats"])}
  manager = checkpoint.create_manager(str(directory), async_save=False)
  checkpoint.save(manager, 0, model=variables, meta=dict(model="resnext11_4x16d", num_classes=10,
                                                         model_overrides=ARCH, source="test"))
  manager.close()
  return str(directory), jax.device_get(variables)


def test_finetune_new_head_frozen_stem_and_layer1(tmp_path, pretrained):
  directory, start = pretrained
  write_image_folder(tmp_path / "images", per_class=8)
  config = tiny_config(dataset="imagefolder", data_dir=str(tmp_path / "images"), train_split="train",
                       eval_split="val", image_size=16, batch_size=8, eval_batch_size=8, num_train_steps=4,
                       learning_rate=0.2, init_checkpoint=directory, frozen_stages=2, weight_decay=1e-2)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["num_examples"] == 9 and result["step"] == 4  # every val image once

  _, tuned, _, meta = checkpoint.load_variables(config, str(tmp_path / "run"), runtime.make_mesh(), (16, 16, 3))
  tuned = jax.device_get(tuned)
  assert meta["num_classes"] == 3 and meta["class_names"] == list(CLASSES)
  assert tuned["params"]["fc"]["kernel"].shape == (64, 3)  # a new head for the new classes
  for name in ("conv1", "bn1", "layer1_0"):  # frozen: weights and BN statistics exactly as loaded
    for collection in ("params", "batch_stats"):
      if name in start[collection]:
        jax.tree.map(np.testing.assert_array_equal, tuned[collection][name], start[collection][name])
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), tuned["params"]["layer2_0"],
                       start["params"]["layer2_0"])
  assert all(jax.tree.leaves(moved))  # the rest trains
  assert not np.array_equal(tuned["batch_stats"]["layer2_0"]["bn1"]["mean"],
                            start["batch_stats"]["layer2_0"]["bn1"]["mean"])


def test_frozen_stages_out_of_range_is_a_clear_error():
  with pytest.raises(ValueError, match="frozen_stages must be in 0..3"):
    models.create_model("resnext11_4x16d", stage_sizes=(1, 1), planes=(8, 16), frozen_stages=4)
