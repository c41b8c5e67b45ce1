"""torchvision ResNet/ResNeXt weights -> Flax variables, and a CLI that writes them as an Orbax checkpoint.

The model's submodules carry torchvision's names, so the mapping is two small tables: module paths
('layer1.0.downsample.0' -> 'layer1_0/downsample_0') and leaf names by module kind (conv, bn, linear).

  python -m resnext_jax.convert --arch resnext50_32x4d --weights resnext50_32x4d-1a0047aa.pth --output DIR
"""

import argparse
import os
import re
import sys

import numpy as np

from resnext_jax.errors import ConversionError

# torchvision leaf -> (Flax collection, Flax leaf), per module kind.
_LEAVES = {
    "conv": {"weight": ("params", "kernel")},
    "bn": {"weight": ("params", "scale"), "bias": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")},
    "linear": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
}
# PyTorch layouts -> Flax layouts: conv OIHW -> HWIO (grouped: O, I/groups, H, W -> H, W, I/groups, O).
_LAYOUT = {"conv": (2, 3, 1, 0), "linear": (1, 0)}
_IGNORED_LEAVES = ("num_batches_tracked",)


def _module_kind(flax_module):
  leaf = flax_module.split("/")[-1]
  if leaf == "fc":
    return "linear"
  if leaf.startswith("conv") or leaf == "downsample_0":
    return "conv"
  if leaf.startswith("bn") or leaf == "downsample_1":
    return "bn"
  return None


def _flax_module_path(torch_module):
  """'layer1.0.downsample.0' -> 'layer1_0/downsample_0'."""
  path = re.sub(r"layer(\d+)\.(\d+)", r"layer\1_\2", torch_module)
  path = re.sub(r"downsample\.(\d+)", r"downsample_\1", path)
  return path.replace(".", "/")


def _to_numpy(value):
  if hasattr(value, "detach"):  # a torch tensor; torch itself is never imported here
    value = value.detach().cpu().float().numpy() if str(value.dtype) == "torch.bfloat16" else value.detach().cpu().numpy()
  return np.asarray(value)


def torchvision_to_flax(state_dict, target=None, dtype=None):
  """Maps a torchvision ResNet/ResNeXt state dict to {'params': ..., 'batch_stats': ...}.

  `state_dict` values may be numpy arrays or torch tensors. With `target` (a variables tree of arrays or
  ShapeDtypeStructs, e.g. from jax.eval_shape(model.init, ...)) every tensor is checked against the model,
  and missing or extra tensors and shape mismatches raise a ConversionError naming the tensor. `dtype`
  casts floating values (default: keep the state dict's dtype).
  """
  variables = {"params": {}, "batch_stats": {}}
  for name, value in state_dict.items():
    torch_module, _, leaf = name.rpartition(".")
    if leaf in _IGNORED_LEAVES:
      continue
    module = _flax_module_path(torch_module)
    kind = _module_kind(module)
    if kind is None or leaf not in _LEAVES[kind]:
      raise ConversionError(f"unexpected tensor {name!r}: not a torchvision ResNet/ResNeXt parameter")
    collection, flax_leaf = _LEAVES[kind][leaf]
    array = _to_numpy(value)
    if leaf == "weight" and kind in _LAYOUT:
      if array.ndim != len(_LAYOUT[kind]):
        raise ConversionError(f"tensor {name!r} has shape {array.shape}; a {kind} weight has "
                              f"{len(_LAYOUT[kind])} dimensions")
      array = array.transpose(_LAYOUT[kind])
    if dtype is not None:
      array = array.astype(dtype)
    _set(variables[collection], f"{module}/{flax_leaf}", array)
  if target is not None:
    _check(variables, target)
  return variables


def _set(tree, path, value):
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      yield from _flatten(value, path)
    else:
      yield path, value


def _torch_name(flax_path):
  """'params/layer1_0/downsample_1/scale' -> 'layer1.0.downsample.1.weight'."""
  collection, *module, leaf = flax_path.split("/")
  module = "/".join(module)
  kind = _module_kind(module)
  torch_leaf = next((t for t, (c, f) in _LEAVES.get(kind, {}).items() if (c, f) == (collection, leaf)), leaf)
  module = re.sub(r"layer(\d+)_(\d+)", r"layer\1.\2", module)
  module = re.sub(r"downsample_(\d+)", r"downsample.\1", module).replace("/", ".")
  return f"{module}.{torch_leaf}"


def flax_to_torchvision(variables):
  """The inverse of torchvision_to_flax: {'params', 'batch_stats'} -> torchvision-named numpy arrays."""
  state_dict = {}
  for path, value in _flatten({k: dict(variables[k]) for k in ("params", "batch_stats")}):
    name = _torch_name(path)
    array = np.asarray(value)
    kind = _module_kind(path.split("/", 1)[1].rsplit("/", 1)[0])
    if name.endswith(".weight") and kind in _LAYOUT:
      array = array.transpose(np.argsort(_LAYOUT[kind]))
    state_dict[name] = np.ascontiguousarray(array)  # safetensors writes a view's buffer, not its layout
  return state_dict


def _check(variables, target):
  got = dict(_flatten({k: variables[k] for k in ("params", "batch_stats")}))
  want = dict(_flatten({k: dict(target[k]) for k in ("params", "batch_stats") if k in target}))
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing:
    raise ConversionError(f"state dict lacks {len(missing)} tensor(s) the model needs, e.g. "
                          f"{_torch_name(missing[0])!r}")
  if extra:
    raise ConversionError(f"state dict has {len(extra)} tensor(s) the model does not, e.g. "
                          f"{_torch_name(extra[0])!r}")
  for path, want_leaf in want.items():
    if tuple(got[path].shape) != tuple(want_leaf.shape):
      raise ConversionError(f"tensor {_torch_name(path)!r} has shape (in Flax layout) {got[path].shape}; "
                            f"the model expects {tuple(want_leaf.shape)}")


def load_state_dict(path):
  """Reads a .safetensors (no torch needed) or a torch .pth/.pt state dict as numpy arrays."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch); a .safetensors file does not") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  state = state.get("state_dict", state) if isinstance(state, dict) else state
  return {k: _to_numpy(v) for k, v in state.items()}


def convert_file(arch, weights, output):
  """Converts `weights` for registry model `arch` and saves an Orbax checkpoint (step 0) in `output`."""
  import jax
  import jax.numpy as jnp

  from resnext_jax import checkpoint, models

  state_dict = load_state_dict(weights)
  if "fc.weight" not in state_dict:
    raise ConversionError(f"{weights} has no 'fc.weight': not a torchvision classifier state dict")
  num_classes = int(state_dict["fc.weight"].shape[0])
  model = models.create_model(arch, num_classes=num_classes)
  size = models.native_image_size(model)
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  variables = torchvision_to_flax(state_dict, target=target, dtype=np.float32)
  manager = checkpoint.create_manager(output, async_save=False)
  meta = dict(model=arch, num_classes=num_classes, source=f"torchvision:{os.path.basename(weights)}")
  checkpoint.save(manager, 0, model=variables, meta=meta)
  manager.wait_until_finished()
  manager.close()
  return meta


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", required=True, help="registry name, e.g. resnext50_32x4d")
  parser.add_argument("--weights", required=True, help="torchvision state dict: .pth (needs torch) or .safetensors")
  parser.add_argument("--output", required=True, help="directory for the Orbax checkpoint")
  args = parser.parse_args(argv)
  try:
    meta = convert_file(args.arch, args.weights, os.path.abspath(args.output))
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.output}: {meta}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
