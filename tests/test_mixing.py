"""Mixup and CutMix in the train step (resnext_jax.mixing) against timm's Mixup, and the losses on soft targets.

Exact comparisons pin timm's randomness: its per-batch draw (`_params_per_batch`) is replaced by fixed
(lam, use_cutmix), and numpy's seed fixes the CutMix box centre, which our pure functions then take explicitly.
The draws themselves (which a JAX key makes) are compared as distributions over many draws with timm's numpy
ones. timm imports torch, which crashes beside TensorFlow in one process, so timm runs in a child process; those
tests skip without timm (in the optional torch extra: pip install -e '.[torch]') unless RESNEXT_JAX_REQUIRE_TORCH
(as CI sets it) or RESNEXT_JAX_REQUIRE_TIMM is set.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import REPO, tiny_config
from resnext_jax import errors
from resnext_jax import mixing
from resnext_jax import models
from resnext_jax import optim
from resnext_jax import runtime
from resnext_jax import train


def _timm_formulas_box(lam, cy, cx, h, w):
  """timm.data.mixup.rand_bbox (timm 1.0.31, margin 0) with the centre given, and cutmix_bbox_and_lam's
  correction (float64)."""
  ratio = np.sqrt(1 - lam)
  cut_h, cut_w = int(h * ratio), int(w * ratio)
  yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
  xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
  return (yl, yh, xl, xh), 1. - (yh - yl) * (xh - xl) / float(h * w)


def test_mixup_target_is_timms_formula():
  labels, k, lam, smoothing = np.array([3, 1, 4, 1, 0]), 5, 0.3, 0.1
  off, on = smoothing / k, 1 - smoothing + smoothing / k
  y1 = np.full((5, k), off)
  y1[np.arange(5), labels] = on
  want = y1 * lam + y1[::-1] * (1 - lam)
  np.testing.assert_allclose(mixing.mixup_target(jnp.asarray(labels), k, lam, smoothing), want, rtol=1e-6)
  # lam 1, no smoothing: the one-hot labels; rows sum to 1 whatever lam and smoothing.
  np.testing.assert_array_equal(mixing.mixup_target(jnp.asarray(labels), k), np.eye(k)[labels])
  np.testing.assert_allclose(mixing.mixup_target(jnp.asarray(labels), k, 0.77, 0.2).sum(-1), 1.0, rtol=1e-6)


def test_cutmix_box_is_timms_rand_bbox():
  rng = np.random.default_rng(0)
  for h, w in ((1, 1), (7, 13), (16, 12), (32, 32), (39, 5)):
    lam = rng.beta(1.0, 1.0, 200).astype(np.float32)  # float32 lam for both sides
    cy, cx = rng.integers(0, h, 200), rng.integers(0, w, 200)
    got_box, got_lam = jax.jit(jax.vmap(lambda l, y, x: mixing.cutmix_box(l, y, x, h, w)))(lam, cy, cx)
    for i in range(200):
      want_box, want_lam = _timm_formulas_box(float(lam[i]), cy[i], cx[i], h, w)
      assert tuple(int(v[i]) for v in got_box) == tuple(int(v) for v in want_box), (lam[i], cy[i], cx[i], h, w)
      np.testing.assert_allclose(got_lam[i], want_lam, rtol=1e-6, atol=1e-7)


def test_mix_images_pinned():
  x = jax.random.normal(jax.random.key(0), (4, 6, 7, 3))
  flip = np.asarray(x)[::-1]
  mixed = mixing.mix_images(x, 0.3, False, None)
  np.testing.assert_allclose(mixed, 0.3 * np.asarray(x) + 0.7 * flip, rtol=1e-6, atol=1e-6)
  box = (1, 4, 2, 7)
  for use_cutmix in (True, False):
    mixed = np.asarray(mixing.mix_images(x, 0.3, use_cutmix, box))
    if use_cutmix:  # exactly the reversed batch inside the box, exactly the batch outside
      want = np.asarray(x).copy()
      want[:, 1:4, 2:7] = flip[:, 1:4, 2:7]
      np.testing.assert_array_equal(mixed, want)
    else:
      np.testing.assert_allclose(mixed, 0.3 * np.asarray(x) + 0.7 * flip, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mixing.mix_images(x, 1.0, False, box), x)  # lam 1: unchanged


def _draws(spec, n, h=16, w=12, seed=0):
  """n per-batch draws of mix_batch's parameters: (lam drawn, use_cutmix, lam of the targets)."""
  def one(key):
    lam, use_cutmix, (cy, cx) = mixing.sample_params(key, spec, h, w)
    _, lam_box = mixing.cutmix_box(lam, cy, cx, h, w)
    return lam, use_cutmix, jnp.where(use_cutmix, lam_box, lam), cy, cx
  return [np.asarray(v) for v in jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), n))]


def test_draw_distributions():
  """prob, switch_prob and Beta(alpha, alpha) as timm's _params_per_batch draws them (numpy's Beta here)."""
  n = 10_000
  spec = mixing.Mixup(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.4)
  lam, use_cutmix, _, cy, cx = _draws(spec, n)
  applied = lam != 1.0
  def close(frac, p, count):
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / count), (frac, p)
  close(applied.mean(), 0.7, n)
  close(use_cutmix[applied].mean(), 0.4, applied.sum())
  assert not use_cutmix[~applied].any()
  np_rng = np.random.default_rng(1)
  for chosen, alpha in ((use_cutmix, 1.0), (applied & ~use_cutmix, 0.8)):
    assert stats.kstest(lam[chosen], stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert stats.ks_2samp(lam[chosen], np_rng.beta(alpha, alpha, chosen.sum())).pvalue > 1e-3
  # The box centre is uniform over the image.
  assert (cy.min(), cy.max(), cx.min(), cx.max()) == (0, 15, 0, 11)
  close(np.mean(cy < 8), 0.5, n)
  # One alpha only: that one, always (float32 rounds some Beta(0.2, 0.2) draws to exactly 1: no mixing then, as
  # timm's float64 lam of 1 - 1e-8 mixes nothing visible in float32 either).
  lam, use_cutmix, *_ = _draws(mixing.Mixup(num_classes=10, cutmix_alpha=1.0), 2000)
  assert use_cutmix.all() and np.mean(lam < 1) > 0.99
  lam, use_cutmix, *_ = _draws(mixing.Mixup(num_classes=10, mixup_alpha=0.2), 2000)
  assert not use_cutmix.any() and np.mean(lam < 1) > 0.9


def test_corrected_cutmix_lam_distribution_matches_timms_formulas():
  """timm's cutmix_bbox_and_lam with numpy draws (Beta(1, 1), uniform centre) vs ours from JAX draws."""
  n, h, w = 20_000, 16, 12
  _, _, lam_ours, _, _ = _draws(mixing.Mixup(num_classes=10, cutmix_alpha=1.0), n, h, w, seed=3)
  rng = np.random.default_rng(4)
  lam_timm = np.array([_timm_formulas_box(rng.beta(1.0, 1.0), rng.integers(0, h), rng.integers(0, w), h, w)[1]
                       for _ in range(n)])
  # Compared as counts of unboxed pixels: float32 and float64 values of one fraction would count as different.
  pixels = lambda lam: np.round(np.asarray(lam, np.float64) * h * w)
  assert stats.ks_2samp(pixels(lam_ours), pixels(lam_timm)).pvalue > 1e-3
  assert abs(lam_ours.mean() - lam_timm.mean()) < 0.01


def test_mix_batch_targets_follow_the_images():
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 3, 4, 5])
  for spec in (mixing.Mixup(num_classes=6, mixup_alpha=1.0, label_smoothing=0.1),
               mixing.Mixup(num_classes=6, cutmix_alpha=1.0, label_smoothing=0.1)):
    for seed in range(5):
      key = jax.random.key(seed)
      images, targets, lam = jax.jit(functools.partial(mixing.mix_batch, spec=spec))(key, images=x, labels=labels)
      np.testing.assert_allclose(targets, mixing.mixup_target(labels, 6, lam, 0.1), rtol=1e-6)
      if spec.cutmix_alpha:  # lam = the fraction of pixels from the example itself
        own = np.all(np.asarray(images) == np.asarray(x), axis=-1)[0].mean()
        np.testing.assert_allclose(own, lam, rtol=1e-6)
      else:
        np.testing.assert_allclose(images, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)


# --- timm itself, in a child process. ---

_TIMM_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from timm.data.mixup import Mixup, cutmix_bbox_and_lam
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
    d = np.load(sys.argv[1])
    cases = json.loads(sys.argv[3])
    out = {}
    images, labels, k = d["images"], torch.from_numpy(d["labels"]), int(d["num_classes"])
    for i, (mixup_alpha, cutmix_alpha, lam, use_cutmix, smoothing, seed) in enumerate(cases):
      m = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=1.0, switch_prob=0.5, mode="batch",
                label_smoothing=smoothing, num_classes=k)
      m._params_per_batch = lambda lam=lam, use_cutmix=use_cutmix: (lam, use_cutmix)
      np.random.seed(seed)
      x, t = m(torch.from_numpy(images.copy()), labels)
      np.random.seed(seed)
      cy = np.random.randint(0, images.shape[2]); cx = np.random.randint(0, images.shape[3])
      out[f"x{i}"], out[f"t{i}"], out[f"c{i}"] = x.numpy(), t.numpy(), np.array([cy, cx])
    logits, soft = torch.from_numpy(d["logits"]), torch.from_numpy(d["soft"])
    out["bce_soft"] = BinaryCrossEntropy(smoothing=0.1, target_threshold=None)(logits, soft).numpy()
    out["bce_soft_thresh"] = BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)(logits, soft).numpy()
    out["bce_sparse"] = BinaryCrossEntropy(smoothing=0.1, target_threshold=None)(logits, labels).numpy()
    out["bce_sparse_thresh"] = BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)(logits, labels).numpy()
    out["soft_ce"] = SoftTargetCrossEntropy()(logits, soft).numpy()
    # Distributions of timm's own draws.
    np.random.seed(0)
    m = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.4, mode="batch", num_classes=k)
    draws = [m._params_per_batch() for _ in range(20000)]
    out["draw_lam"] = np.array([float(l) for l, _ in draws]); out["draw_cutmix"] = np.array([bool(c) for _, c in draws])
    # timm's box itself, for many lams and centres (numpy's seed pins the centre).
    boxes, centres = [], []
    for seed, lam in enumerate(d["box_lams"]):
      np.random.seed(seed)
      (yl, yh, xl, xh), lam_c = cutmix_bbox_and_lam((10, 12), float(lam))
      boxes.append([yl, yh, xl, xh, lam_c])
      np.random.seed(seed)
      centres.append([np.random.randint(0, 10), np.random.randint(0, 12)])
    out["boxes"], out["centres"] = np.array(boxes, np.float64), np.array(centres)
    out["corrected"] = np.array([cutmix_bbox_and_lam((16, 12), np.random.beta(1.0, 1.0))[1] for _ in range(20000)])
    np.savez(sys.argv[2], **out)
""")


def _require_timm():
  missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
  if missing:
    if os.environ.get("RESNEXT_JAX_REQUIRE_TIMM") or os.environ.get("RESNEXT_JAX_REQUIRE_TORCH"):
      pytest.fail(f"{', '.join(missing)} not installed, and RESNEXT_JAX_REQUIRE_TORCH/TIMM is set "
                  "(pip install -e '.[torch]')")
    pytest.skip(f"{', '.join(missing)} not installed (optional test dependency: pip install timm)")


def test_against_timm(tmp_path):
  _require_timm()
  rng = np.random.default_rng(0)
  k = 7
  images = rng.standard_normal((6, 3, 10, 12)).astype(np.float32)  # NCHW for timm
  labels = np.array([3, 0, 6, 6, 1, 2])
  f32 = lambda v: float(np.float32(v))
  # (mixup_alpha, cutmix_alpha, lam, use_cutmix, smoothing, numpy seed of the box centre)
  cases = [(1.0, 0.0, f32(0.37), False, 0.0, 0), (0.2, 1.0, f32(0.81), False, 0.1, 0),
           (0.0, 1.0, f32(0.6), True, 0.1, 1), (0.2, 1.0, f32(0.3), True, 0.0, 2), (0.2, 1.0, f32(0.95), True, 0.1, 3),
           (1.0, 1.0, 1.0, False, 0.1, 4), (0.0, 1.0, 1.0, True, 0.0, 5)]
  logits = rng.standard_normal((6, k)).astype(np.float32) * 3
  soft = np.asarray(mixing.mixup_target(jnp.asarray(labels), k, 0.7, 0.1))
  box_lams = rng.beta(1.0, 1.0, 300).astype(np.float32)
  np.savez(tmp_path / "in.npz", images=images, labels=labels, num_classes=k, logits=logits, soft=soft,
           box_lams=box_lams)
  subprocess.run([sys.executable, "-c", _TIMM_CHILD, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                  json.dumps(cases)], check=True, timeout=300, cwd=REPO)
  ref = np.load(tmp_path / "out.npz")

  x = jnp.asarray(images.transpose(0, 2, 3, 1))  # NHWC
  for i, (_, _, lam, use_cutmix, smoothing, _) in enumerate(cases):
    box = None
    if use_cutmix:
      cy, cx = ref[f"c{i}"]
      box, lam = mixing.cutmix_box(lam, int(cy), int(cx), 10, 12)
    mixed = mixing.mix_images(x, lam, use_cutmix, box)
    np.testing.assert_allclose(np.asarray(mixed).transpose(0, 3, 1, 2), ref[f"x{i}"], rtol=1e-6, atol=1e-6,
                               err_msg=str(cases[i]))
    np.testing.assert_allclose(mixing.mixup_target(jnp.asarray(labels), k, lam, smoothing), ref[f"t{i}"],
                               rtol=1e-6, atol=1e-7, err_msg=str(cases[i]))

  # timm's CutMix boxes and corrected lams, for 300 lams and centres.
  centres = ref["centres"]
  got_box, got_lam = jax.jit(jax.vmap(lambda l, y, x: mixing.cutmix_box(l, y, x, 10, 12)))(
      box_lams, centres[:, 0], centres[:, 1])
  np.testing.assert_array_equal(np.stack(got_box, 1), ref["boxes"][:, :4])
  np.testing.assert_allclose(got_lam, ref["boxes"][:, 4], rtol=1e-6, atol=1e-7)

  bce = lambda targets, threshold=0.0: float(optim.binary_cross_entropy(logits, targets, threshold).mean())
  smoothed = mixing.mixup_target(jnp.asarray(labels), k, 1.0, 0.1)
  np.testing.assert_allclose(bce(soft), ref["bce_soft"], rtol=1e-5)
  np.testing.assert_allclose(bce(soft, 0.2), ref["bce_soft_thresh"], rtol=1e-5)
  np.testing.assert_allclose(bce(smoothed), ref["bce_sparse"], rtol=1e-5)
  np.testing.assert_allclose(bce(smoothed, 0.2), ref["bce_sparse_thresh"], rtol=1e-5)
  np.testing.assert_allclose(optim.soft_target_cross_entropy(logits, soft).mean(), ref["soft_ce"], rtol=1e-5)

  # timm's own draws against ours, as distributions.
  spec = mixing.Mixup(num_classes=k, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.4)
  lam, use_cutmix, *_ = _draws(spec, 20_000)
  t_lam, t_cutmix = ref["draw_lam"], ref["draw_cutmix"]
  assert abs(np.mean(lam != 1) - np.mean(t_lam != 1)) < 0.02
  assert abs(use_cutmix.mean() - t_cutmix.mean()) < 0.02
  ours_mixup, timm_mixup = lam[(lam != 1) & ~use_cutmix], t_lam[(t_lam != 1) & ~t_cutmix]
  for ours, theirs in ((lam[use_cutmix], t_lam[t_cutmix]), (ours_mixup, timm_mixup)):
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
  _, _, corrected, _, _ = _draws(mixing.Mixup(num_classes=k, cutmix_alpha=1.0), 20_000, 16, 12, seed=5)
  pixels = lambda lam: np.round(np.asarray(lam, np.float64) * 16 * 12)  # as in the test above
  assert stats.ks_2samp(pixels(corrected), pixels(ref["corrected"])).pvalue > 1e-3


# --- In the train step. ---


def _tiny_setup(**overrides):
  config = tiny_config(**overrides)
  model = models.create_model("resnext11_4x16d", num_classes=10, conv_impl="xla",
                              **{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                 for k, v in config.model_overrides.items()},
                              drop_path_rate=config.drop_path_rate)
  schedule = optim.learning_rate_schedule(config, optim.durations(config, config.synthetic_num_examples))
  tx = optim.create_optimizer(config, schedule)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  state, _ = train.create_train_state(config, model, tx, mesh, (8, 8, 3))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((16, 8, 8, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  step = functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                           **train.train_step_options(config, model))
  return config, model, state, batch, step


def test_default_step_draws_nothing():
  """The plain recipe's step (every new option off) traces no random draw, and is the program of train_step
  called without the new options; mixing and drop path do draw."""
  config, model, state, batch, step = _tiny_setup()
  jaxpr = str(jax.make_jaxpr(step)(state, batch))
  assert "random_bits" not in jaxpr
  plain = functools.partial(train.train_step, model=model, tx=step.keywords["tx"], schedule=step.keywords["schedule"],
                            label_smoothing=config.label_smoothing, grad_accum_steps=config.grad_accum_steps,
                            ema_decay=config.ema_decay, rng_impl=config.rng_impl)
  assert str(jax.make_jaxpr(plain)(state, batch)) == jaxpr
  for overrides in (dict(mixup_alpha=0.2), dict(cutmix_alpha=1.0), dict(drop_path_rate=0.1)):
    _, _, state, batch, step = _tiny_setup(**overrides)
    assert "random_bits" in str(jax.make_jaxpr(step)(state, batch)), overrides


def test_step_loss_is_bce_on_mixed_targets():
  """The step's loss is timm's BCE of the model on the batch mixed with the step's key (fold_in(state.rng,
  step), then the mixing stream), with smoothing folded into the targets and thresholded."""
  config, model, state, batch, step = _tiny_setup(mixup_alpha=0.4, cutmix_alpha=1.0, mix_switch_prob=0.5,
                                                  label_smoothing=0.1, loss="bce", bce_target_threshold=0.2)
  new, metrics = jax.jit(step)(state, batch)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=config.rng_impl), state.step)
  spec = mixing.from_config(config, 10)

  @jax.jit
  def expected(state, batch):
    images, targets, _ = mixing.mix_batch(jax.random.fold_in(key, train._MIX_STREAM), spec, batch["image"],
                                          batch["label"])
    logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
                            mutable=["batch_stats"])
    return optim.binary_cross_entropy(logits, targets, 0.2).mean()

  np.testing.assert_allclose(metrics["loss"], expected(state, batch), rtol=1e-5)
  assert int(new.step) == 1 and np.isfinite(metrics["grad_norm"])


def test_config_errors_name_the_key():
  mesh = runtime.make_mesh()
  for key, value in (("mixup_alpha", -1.0), ("cutmix_alpha", -0.5), ("mix_prob", 1.5), ("mix_switch_prob", -0.1),
                     ("loss", "hinge"), ("bce_target_threshold", 1.0), ("label_smoothing", 1.0)):
    overrides = {"mixup_alpha": 0.2, key: value}
    with pytest.raises(errors.ConfigError, match=key):
      train.check_config(tiny_config(**overrides), mesh)  # before any work is done
    with pytest.raises(errors.ConfigError, match=key):
      train.train_step_options(tiny_config(**overrides), models.from_config(tiny_config(), 10))
  assert mixing.from_config(tiny_config(), 10) is None  # both alphas 0: off


_SHARDED_CHILD = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from resnext_jax import mixing, runtime
    assert jax.device_count() == 8
    mesh = runtime.make_mesh()
    spec = mixing.Mixup(num_classes=10, mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    labels = jnp.arange(16) % 10
    batch = NamedSharding(mesh, P("data"))
    f = functools.partial(mixing.mix_batch, spec=spec)
    for seed in range(6):
      key = jax.random.key(seed)
      want = jax.jit(f)(key, images=x, labels=labels)  # one device
      got = jax.jit(f, out_shardings=(batch, batch, NamedSharding(mesh, P())))(
          key, images=jax.device_put(x, batch), labels=jax.device_put(labels, batch))
      assert got[0].sharding.spec == P("data")
      # The same draws (lam exactly); images and targets to XLA's rounding (the programs fuse differently). A
      # per-shard reverse would pair other examples: far off.
      np.testing.assert_array_equal(np.asarray(want[2]), np.asarray(got[2]))
      for a, b in zip(want[:2], got[:2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    print("OK")
""")


def test_mixing_on_8_device_mesh_is_the_global_batch_mix():
  """Under jit over a batch sharded on 8 devices the mix is that of the global batch with its global reverse:
  the same key's mix on one device."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", _SHARDED_CHILD], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
