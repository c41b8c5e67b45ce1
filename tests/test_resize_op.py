"""The input pipeline's resize op (datasets/resize_op.py): bit-identical to the TF ops it replaces, alone and
inside the train and eval transforms; bad input named; a failed build said once, with the same pixels."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from resnext_jax import errors
from resnext_jax.cpu import build as cpu_build
from resnext_jax.datasets import resize_op
from resnext_jax.datasets import synthetic_jpegs
from resnext_jax.datasets import transforms


def _op():
  try:
    cpu_build.compiler()
  except errors.KernelUnavailable:
    pytest.skip("no C++ compiler here: the op cannot be built (the fallback is tested below)")
  lib = resize_op.library()
  assert lib is not None, "a C++ compiler is installed, so the resize op must build and load"
  return lib


def _tf_ops(image, size, flip):
  out = transforms.to_uint8(transforms.resize(image, size))
  return tf.reverse(out, [1]) if flip else out


def test_the_op_equals_tensorflows_resize_round_cast_and_flip_bit_for_bit():
  lib = _op()
  rng = np.random.default_rng(0)
  shapes = [(1, 1), (1, 9), (7, 1), (2, 3)] + [tuple(rng.integers(1, 600, 2)) for _ in range(150)]
  for i, (h, w) in enumerate(shapes):
    size = int(rng.choice([1, 5, 32, 224, 299, 640]))  # downscales, upscales, both
    image = tf.constant(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    flip = bool(i % 2)
    got = lib.resnext_resize_bilinear_u8(image, [0, w], flip, size=size).numpy()
    np.testing.assert_array_equal(got, _tf_ops(image, size, flip).numpy(), err_msg=f"{h}x{w} -> {size}, {flip}")


def test_the_op_resizes_the_columns_it_is_given_as_if_they_were_the_image():
  """decode_window_columns hands it rows wider than the window; the columns around the window are never read."""
  lib = _op()
  rng = np.random.default_rng(1)
  for i in range(60):
    h, w = rng.integers(1, 300, 2)
    first, extra = rng.integers(0, 16), rng.integers(0, 16)
    size = int(rng.choice([1, 7, 64, 224]))
    image = rng.integers(0, 256, (h, first + w + extra, 3), dtype=np.uint8)
    window = tf.constant(image[:, first:first + w])
    image[:, :first], image[:, first + w:] = 0, 255  # would show at the edges if read
    got = lib.resnext_resize_bilinear_u8(tf.constant(image), [first, w], bool(i % 2), size=size).numpy()
    np.testing.assert_array_equal(got, _tf_ops(window, size, bool(i % 2)).numpy(), err_msg=f"{h}x{w}+{first}")


def test_the_transforms_give_the_same_pixels_with_and_without_the_op(monkeypatch):
  _op()
  encoded = [tf.constant(synthetic_jpegs.encode_jpeg(synthetic_jpegs.photo_like(np.random.default_rng(s), h, w)))
             for s, (h, w) in enumerate([(375, 500), (900, 640), (120, 90)])]
  png = synthetic_jpegs.photo_like(np.random.default_rng(9), 200, 300)
  encoded.append(tf.io.encode_png(png))  # decoded whole; the op reads the window's columns of it in place

  def pixels():
    train = [transforms.train_pixels(e, tf.constant([3, s], tf.int64), augment="inception", size=64,
                                     crop_ratio=0.875).numpy() for e in encoded for s in range(10)]
    evals = [transforms.eval_pixels(e, size=64, crop_ratio=0.875).numpy() for e in encoded]
    return np.stack(train), np.stack(evals)

  with_op = pixels()
  monkeypatch.setenv("RESNEXT_JAX_INPUT_OP", "off")
  without = pixels()
  np.testing.assert_array_equal(with_op[0], without[0])
  np.testing.assert_array_equal(with_op[1], without[1])
  flips = {bool(transforms.flip_decision(tf.random.experimental.stateless_split(tf.constant([3, s], tf.int64), 2)[1]))
           for s in range(10)}
  assert flips == {True, False}  # the seeds above mirror some crops and not others


def test_bad_input_is_named():
  lib = _op()
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"\(height, width, 3\) uint8 image, got shape \[4,4,4\]"):
    lib.resnext_resize_bilinear_u8(tf.zeros([4, 4, 4], tf.uint8), [0, 4], False, size=8)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"got shape \[0,4,3\]"):
    lib.resnext_resize_bilinear_u8(tf.zeros([0, 4, 3], tf.uint8), [0, 4], False, size=8)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"columns \[2, 6\) are not a non-empty part of an image 4"):
    lib.resnext_resize_bilinear_u8(tf.zeros([4, 4, 3], tf.uint8), [2, 4], False, size=8)


_FALLBACK = """
import sys
import numpy as np
import tensorflow as tf
from resnext_jax.datasets import resize_op, transforms
assert resize_op.library() is None and resize_op.library() is None  # a second call does not build again
image = tf.constant(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
np.save(sys.argv[1], transforms.resize_to_uint8(image, 32, flip=tf.constant(True)).numpy())
"""


def test_a_failed_build_is_said_once_and_the_tf_ops_give_the_same_pixels(tmp_path):
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), RESNEXT_JAX_CACHE=str(tmp_path / "cache"),
             PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  out = tmp_path / "pixels.npy"
  result = subprocess.run([sys.executable, "-c", _FALLBACK, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count("the input pipeline resizes with TensorFlow's ops instead") == 1, result.stderr
  assert "building the input pipeline's resize op with" in result.stderr and "failed" in result.stderr
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
  np.testing.assert_array_equal(np.load(out), _tf_ops(image, 32, True).numpy())


_DAMAGED = """
from resnext_jax.datasets import resize_op
assert resize_op.library() is not None and hasattr(resize_op.library(), "resnext_resize_bilinear_u8")
"""


def test_a_damaged_cached_op_is_rebuilt(tmp_path):
  _op()
  cached = tmp_path / "cache" / os.path.basename(resize_op.build())  # the name this machine's library has
  cached.parent.mkdir()
  cached.write_bytes(b"not a shared library")
  env = dict(os.environ, RESNEXT_JAX_CACHE=str(cached.parent), PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-c", _DAMAGED], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count("built the input pipeline's resize op") == 1, result.stderr  # rebuilt, once
  assert cached.read_bytes() != b"not a shared library"


@pytest.mark.skipif(not shutil.which("clang++"), reason="no clang++ (Debian's clang; .ci/run installs it)")
def test_clang_builds_the_op_and_it_is_still_bit_identical(tmp_path):
  """Every Mac and many Linux boxes build with clang, whose contraction and vectorisation differ from GCC's."""
  env = dict(os.environ, CXX="clang++", RESNEXT_JAX_CACHE=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                           "bit_for_bit"], env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-4000:]
  assert [f for f in os.listdir(tmp_path / "cache") if f.startswith("tf_resize_op_")]  # built here, by clang


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-g++"),
                    reason="no aarch64 cross-compiler (Debian's g++-aarch64-linux-gnu; .ci/run installs it)")
def test_the_op_compiles_for_arm():
  """Arm has no SSE: the portable loops (this machine cannot run them; they compute what the SSE path does)."""
  result = subprocess.run(["aarch64-linux-gnu-g++", "-fsyntax-only", "-march=armv8-a", *resize_op._FLAGS[:4],  # pylint: disable=protected-access
                           "-Wall", "-Wno-deprecated-declarations", *tf.sysconfig.get_compile_flags(),
                           resize_op.SOURCE], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  ours = re.findall(r"resize_bilinear_u8\.cc:\d+:\d+: warning.*", result.stderr)  # TF's headers warn; we do not
  assert not ours, ours
