"""Reading torch's own .pth files: a state dict written by torch.save, converted by the CLI, restores to the
exact weights it was made from; without torch, the CLI says what to install.

torch is an optional dependency: these tests skip without it, except in CI, which installs it
(.ci/run sets RESNEXT_JAX_REQUIRE_TORCH=1 so that a missing torch fails rather than skips). torch runs only in
child processes: imported beside TensorFlow (which other tests load) it crashes.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax import checkpoint, convert, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_torch(*modules):
  """Skips without torch (and `modules`, e.g. torchvision); fails instead where RESNEXT_JAX_REQUIRE_TORCH is set."""
  missing = [m for m in ("torch", *modules) if importlib.util.find_spec(m) is None]
  if missing:
    if os.environ.get("RESNEXT_JAX_REQUIRE_TORCH"):
      pytest.fail(f"{', '.join(missing)} not installed, and RESNEXT_JAX_REQUIRE_TORCH is set "
                  "(pip install -e '.[torch]')")
    pytest.skip(f"{', '.join(missing)} not installed (optional dependency: pip install -e '.[torch]')")


_SAVE_PTH = """
import sys
import numpy as np, torch
arrays = np.load(sys.argv[1])
state_dict = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
for k in list(state_dict):  # as torchvision's BatchNorm2d writes them
  if k.endswith(".running_var"):
    state_dict[k[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)
torch.save(state_dict, sys.argv[2])
"""


def _run(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                        **kw)


def test_cli_converts_a_torch_saved_pth_to_the_exact_weights(tmp_path):
  require_torch()
  model = models.create_model("resnext11_4x16d", num_classes=10)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.jit(lambda key: model.init(key, x))(jax.random.key(5, impl="rbg"))
  variables = {"params": variables["params"],  # running statistics other than the initial (0, 1)
               "batch_stats": jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(6), v.shape),
                                           variables["batch_stats"])}
  state_dict = convert.flax_to_torchvision(variables)
  assert state_dict["layer1.0.conv2.weight"].shape == (64, 16, 3, 3)  # OIHW, 4 groups of 16
  np.savez(tmp_path / "weights.npz", **state_dict)
  pth = str(tmp_path / "weights.pth")
  saved = _run(["-c", _SAVE_PTH, str(tmp_path / "weights.npz"), pth])
  assert saved.returncode == 0, saved.stderr[-3000:]

  out = str(tmp_path / "ckpt")
  converted = _run(["-m", "resnext_jax.convert", "--arch", "resnext11_4x16d", "--weights", pth, "--output", out])
  assert converted.returncode == 0, converted.stderr[-3000:]
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  restored = checkpoint.restore(out, model_target=dict(target))
  assert restored["step"] == 0 and restored["meta"]["model"] == "resnext11_4x16d"
  assert restored["meta"]["num_classes"] == 10 and restored["meta"]["source"] == "torchvision:weights.pth"
  jax.tree.map(np.testing.assert_array_equal, restored["model"], variables)


_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # as if torch were not installed: `import torch` raises ImportError
from resnext_jax import convert
sys.exit(convert.main(["--arch", "resnext50_32x4d", "--weights", sys.argv[1], "--output", sys.argv[2]]))
"""


def test_pth_without_torch_says_what_to_install(tmp_path):
  pth = tmp_path / "weights.pth"
  pth.write_bytes(b"not read: torch is missing")
  result = _run(["-c", _WITHOUT_TORCH, str(pth), str(tmp_path / "out")])
  assert result.returncode == 2, result.stderr[-3000:]
  assert "needs PyTorch (pip install torch)" in result.stderr and "Traceback" not in result.stderr
