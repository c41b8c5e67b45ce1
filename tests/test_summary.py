"""Model summary (parameters, multiply-adds, FLOPs per image) against torchvision's published figures, and the
1x1 GEMM shapes benchmarks/gemm_shapes.py derives from a model against those read from a train step's HLO."""

import pytest

from benchmarks import gemm_shapes
from resnext_jax import models, summary

# torchvision's model cards (weights' meta "_ops" in GFLOPS, which are multiply-adds, and "num_params"),
# at 224x224.
TORCHVISION = {
    "resnext50_32x4d": (25_028_904, 4.23),
    "resnext101_32x8d": (88_791_336, 16.41),
    "resnext101_64x4d": (83_455_272, 15.46),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_params_and_macs_match_torchvision(name):
  params, gmacs = TORCHVISION[name]
  c = summary.count(models.create_model(name), 224)
  assert c["params"] == params
  assert round(c["macs"] / 1e9, 2) == gmacs


def test_flops_per_image_eval_is_one_forward_and_train_three():
  tiny = models.create_model("resnext11_4x16d")
  macs = summary.count(tiny, 32)["macs"]
  assert summary.flops_per_image(tiny, 32, "eval") == 2 * macs
  assert summary.flops_per_image(tiny, 32, "train") == 6 * macs
  # The convolutions' multiply-adds scale with the pixels, the classifier's (256 x 10) do not.
  assert 4 * summary.flops_per_image(tiny, 32, "eval") - summary.flops_per_image(tiny, 64, "eval") == 3 * 2 * 2560
  with pytest.raises(ValueError, match="mode"):
    summary.flops_per_image(tiny, 32, "predict")
  # The figure benchmark.py typed in for this model: 3 x 8.46 GFLOP per 224 training image.
  assert summary.flops_per_image(models.create_model("resnext50_32x4d"), 224, "train") / 1e9 == pytest.approx(
      25.4, abs=0.05)


def test_gemm_shapes_are_the_train_steps_1x1_products():
  """(pixels, in, out, count) of every 1x1 conv of resnext50_32x4d at batch 32, as read by hand from the
  optimised HLO of its train step (stride-2 downsamples as products over their output pixels)."""
  from_hlo = [(100352, 64, 128, 1), (100352, 128, 256, 3), (100352, 64, 256, 1), (100352, 256, 128, 2),
              (100352, 256, 256, 1), (25088, 256, 512, 5), (25088, 512, 256, 3), (25088, 512, 512, 1),
              (6272, 512, 1024, 7), (6272, 1024, 512, 5), (6272, 1024, 1024, 1), (1568, 1024, 2048, 4),
              (1568, 2048, 1024, 2)]
  model = models.create_model("resnext50_32x4d")
  derived = gemm_shapes.shapes(model, batch_size=32)
  assert sorted(derived) == sorted(from_hlo)
  # 16 blocks of two 1x1 convs, and 4 downsamples; products scale with the batch.
  assert sum(c for *_, c in derived) == 36
  assert sorted(gemm_shapes.shapes(model, batch_size=8)) == sorted((m // 4, k, n, c) for m, k, n, c in from_hlo)
