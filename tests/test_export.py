"""Serving artifacts: jax.export StableHLO (batch-polymorphic) and a jax2tf SavedModel match JAX's logits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax import checkpoint, export, models

TINY = dict(stage_sizes=[1, 1, 1], planes=[8, 16, 32], stem_width=8)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A workdir holding one checkpoint in the layout training writes (model + meta with overrides)."""
  workdir = tmp_path_factory.mktemp("run")
  model = models.create_model("resnext11_4x16d", num_classes=10, stage_sizes=(1, 1, 1), planes=(8, 16, 32),
                              stem_width=8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])}
  manager = checkpoint.create_manager(checkpoint.checkpoint_directory(str(workdir)), async_save=False)
  meta = dict(model="resnext11_4x16d", num_classes=10, model_overrides=TINY, image_size=16,
              class_names=[str(i) for i in range(10)])
  checkpoint.save(manager, 7, model=variables, meta=meta)
  manager.close()
  return workdir, model, variables


def test_stablehlo_and_saved_model_match_jax(trained_workdir, tmp_path):
  workdir, model, variables = trained_workdir
  out = tmp_path / "export"
  assert export.main(["--workdir", str(workdir), "--output", str(out), "--saved-model"]) == 0
  meta = json.loads((out / export.META_FILE).read_text())
  assert meta["step"] == 7 and meta["image_shape"] == [16, 16, 3] and meta["class_names"][3] == "3"
  exported = export.load_stablehlo(out / export.STABLEHLO_FILE)
  assert "cuda" in exported.platforms and "cpu" in exported.platforms
  assert "resnext_jax_" not in exported.mlir_module()  # none of our machine-compiled CPU kernels
  for batch in (1, 5):  # one artifact serves any batch size
    images = jax.random.normal(jax.random.key(batch), (batch, 16, 16, 3))
    np.testing.assert_allclose(exported.call(images), model.apply(variables, images), rtol=1e-5, atol=1e-5)

  import tensorflow as tf
  served = tf.saved_model.load(str(out / export.SAVED_MODEL_DIR)).signatures["serving_default"]
  images = np.asarray(jax.random.normal(jax.random.key(9), (3, 16, 16, 3)))
  np.testing.assert_allclose(served(images=tf.constant(images))["logits"].numpy(),
                             model.apply(variables, images), rtol=1e-4, atol=1e-4)


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
  assert export.main(["--workdir", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "nothing" in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "o")


def test_ema_request_without_ema_is_a_clear_error(trained_workdir, tmp_path, capsys):
  assert export.main(["--workdir", str(trained_workdir[0]), "--output", str(tmp_path / "o"), "--ema"]) == 2
  assert "keeps no EMA weights" in capsys.readouterr().err


def test_machine_specific_conv_impls_are_refused(trained_workdir, tmp_path, capsys):
  """'kernel' (a custom call compiled on this machine) and 'auto' (which may pick it) cannot go into an artifact."""
  for impl in ("kernel", "auto"):
    with pytest.raises(SystemExit):
      export.main(["--workdir", str(trained_workdir[0]), "--output", str(tmp_path / "o"), "--conv-impl", impl])
    assert "invalid choice" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")
