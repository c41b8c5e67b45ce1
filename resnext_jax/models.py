"""ResNeXt and ResNet (Xie et al. 2017; He et al. 2016) with torchvision's structure and parameter names.

Submodules carry torchvision's names with '.' replaced by '_' (`layer2_0/downsample_0`), so converting
weights is a table of leaf names (see convert.py), not a search.
"""

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax.errors import ConfigError
from resnext_jax.layers import pooling
from resnext_jax.layers.batchnorm import BatchNorm
from resnext_jax.layers.conv import HE_FAN_OUT, Conv, conv_general

BLOCK_FORMS = ("grouped", "concat", "split_sum")


# torchvision's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for the classifier.
TORCH_LINEAR_KERNEL = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_linear_bias(fan_in):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class BranchConv(nn.Module):
  """A grouped conv computed as C separate dense convolutions (paper Fig. 3(a)/(b)).

  Same parameter ('kernel', HWIO with I = in/groups) as `Conv`, so it is a drop-in for the grouped 3x3.
  With `sum_branches`, the input channels are split into C groups, each group is convolved with its rows of
  a dense kernel and the C results are summed: Fig. 3(a)'s aggregation by addition of the last 1x1 convs.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int]
  padding: Any
  groups: int
  sum_branches: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = HE_FAN_OUT
  impl: str = "auto"
  backward: bool = True

  @nn.compact
  def __call__(self, x):
    cin, c = x.shape[-1], self.groups
    in_per_kernel = cin if self.sum_branches else cin // c
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, in_per_kernel, self.features),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    conv = functools.partial(conv_general, strides=tuple(self.strides),
                             padding=tuple(map(tuple, self.padding)), groups=1, impl=self.impl,
                             measure=not self.is_initializing(), backward=self.backward)
    xs = jnp.split(x, c, axis=-1)
    if self.sum_branches:
      kernels = jnp.split(kernel, c, axis=2)          # rows of the dense 1x1 that read each branch
      return sum(conv(xi, ki) for xi, ki in zip(xs, kernels))
    kernels = jnp.split(kernel, c, axis=3)            # each branch's d -> d transform
    return jnp.concatenate([conv(xi, ki) for xi, ki in zip(xs, kernels)], axis=-1)


def drop_path(x, rate: float, rng):
  """Stochastic depth (Huang et al. 2016) as timm's `drop_path`: each example's residual branch is zeroed with
  probability `rate` and the kept ones are scaled by 1 / (1 - rate), so the expectation is unchanged."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / keep)


class Bottleneck(nn.Module):
  """ResNeXt block (Fig. 3(c)): 1x1 -> grouped 3x3 (stride here) -> 1x1 to 4*planes, BN after each conv.

  `drop_path_rate` > 0 drops the residual branch per example (stochastic depth), with the 'dropout' RNG stream:
  relu(drop_path(bn3(y)) + shortcut). The model passes 0 in eval mode, where the block is the plain one.
  """
  planes: int
  strides: int
  cardinality: int
  base_width: int
  conv: Any
  branch_conv: Any
  norm: Any
  block_form: str = "grouped"
  zero_init_last_bn: bool = False
  drop_path_rate: float = 0.0
  expansion: int = 4

  @nn.compact
  def __call__(self, x):
    width = (self.planes * self.base_width // 64) * self.cardinality
    out_features = self.planes * self.expansion
    s = (self.strides, self.strides)
    residual = x
    y = self.norm(name="bn1")(self.conv(width, (1, 1), name="conv1")(x), relu=True)
    y = self._grouped_3x3(width, s)(y)
    y = self.norm(name="bn2")(y, relu=True)
    y = self._last_1x1(out_features)(y)
    if self.strides != 1 or x.shape[-1] != out_features:
      residual = self.conv(out_features, (1, 1), strides=s, name="downsample_0")(x)
      residual = self.norm(name="downsample_1")(residual)
    last_bn_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    if self.drop_path_rate > 0:
      y = drop_path(self.norm(name="bn3", scale_init=last_bn_init)(y), self.drop_path_rate, self.make_rng("dropout"))
      self.sow("intermediates", "drop_path", y)  # recorded only where 'intermediates' is mutable (tests)
      return jax.nn.relu(y + residual)
    return self.norm(name="bn3", scale_init=last_bn_init)(y, shortcut=residual, relu=True)  # relu(bn3(y) + res)

  def _grouped_3x3(self, width, strides):
    kw = dict(features=width, kernel_size=(3, 3), strides=strides, padding=((1, 1), (1, 1)), name="conv2")
    if self.block_form == "grouped":
      return self.conv(feature_group_count=self.cardinality, **kw)
    return self.branch_conv(groups=self.cardinality, **kw)

  def _last_1x1(self, out_features):
    kw = dict(features=out_features, kernel_size=(1, 1), name="conv3")
    if self.block_form == "split_sum":
      return self.branch_conv(groups=self.cardinality, strides=(1, 1), padding=((0, 0), (0, 0)),
                              sum_branches=True, **kw)
    return self.conv(**kw)


class ResNeXt(nn.Module):
  """ResNeXt/ResNet classifier on NHWC images; logits are at least float32 whatever the compute dtype.

  `features=True` returns the stem and stage outputs {'stem', 'layer1', ...}; for the ImageNet stem,
  layer1..layer4 are the C2..C5 maps (strides 4, 8, 16, 32) that detection/segmentation heads use.

  `frozen_stages=k` (fine-tuning) freezes the stem (k >= 1) and layer1..layer{k-1}: their BN layers use the
  running statistics in training too, and no gradient flows into them (nor is their backward computed);
  the optimizer leaves their parameters alone (see `stage_index`).

  `drop_path_rate` (training only, no parameters): stochastic depth on each block's residual branch, the rate
  linear over the blocks of the whole network as in timm's ResNet (block i of N: drop_path_rate * i / (N - 1),
  so the first block keeps its branch and the last is dropped at drop_path_rate). It needs the 'dropout' RNG
  in `apply(..., train=True)`; eval mode and frozen stages do not drop (a rate of 0 is today's model).
  """
  stage_sizes: Sequence[int]
  cardinality: int = 1
  base_width: int = 64
  planes: Sequence[int] = (64, 128, 256, 512)
  stem: str = "imagenet"          # 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1, no pool)
  stem_width: int = 64
  num_classes: int = 1000
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"
  block_form: str = "grouped"
  zero_init_last_bn: bool = False
  frozen_stages: int = 0
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Initialising, only the parameters' shapes matter (every impl makes the same ones): XLA's ops, so that
    # init neither waits for the CPU kernels' first-use build nor times layers.
    conv_impl = "xla" if self.is_initializing() else self.conv_impl
    kernel_impl = _kernel_impl(conv_impl)  # batch norm's and max pooling's
    # In eval mode no gradient is taken: 'auto' then times each layer's forward alone (layers/conv.py).
    conv = functools.partial(Conv, use_bias=False, impl=conv_impl, backward=train, **precision)
    branch_conv = functools.partial(BranchConv, impl=conv_impl, backward=train, **precision)
    # torchvision's BatchNorm2d: eps 1e-5, PyTorch momentum 0.1 (= Flax 0.9). Flax keeps the statistics in
    # float32 whatever dtype is; under jit over a sharded batch the batch mean is already global (synced BN).
    def norm(stage):
      frozen = stage < self.frozen_stages
      return functools.partial(BatchNorm, use_running_average=not train or frozen, momentum=0.9,
                               epsilon=1e-5, impl=kernel_impl, **precision)

    def freeze(y, stage):
      return jax.lax.stop_gradient(y) if stage < self.frozen_stages else y

    outputs = {"stem": freeze(self._stem(x, conv, norm(0), kernel_impl, backward=train), 0)}
    y = outputs["stem"]
    num_blocks_total, block_index = sum(self.stage_sizes), 0
    for i, (num_blocks, planes) in enumerate(zip(self.stage_sizes, self.planes)):
      for j in range(num_blocks):
        # timm's resnet: drop_path_rate * net_block_idx / (net_num_blocks - 1); none in eval or frozen stages.
        rate = self.drop_path_rate * block_index / max(1, num_blocks_total - 1)
        rate = rate if train and i + 1 >= self.frozen_stages else 0.0
        block_index += 1
        y = Bottleneck(planes=planes, strides=2 if i > 0 and j == 0 else 1, cardinality=self.cardinality,
                       base_width=self.base_width, conv=conv, branch_conv=branch_conv, norm=norm(i + 1),
                       block_form=self.block_form, zero_init_last_bn=self.zero_init_last_bn,
                       drop_path_rate=rate, name=f"layer{i + 1}_{j}")(y)
      y = outputs[f"layer{i + 1}"] = freeze(y, i + 1)
    if features:
      return outputs
    y = jnp.mean(y, axis=(1, 2))
    y = nn.Dense(self.num_classes, kernel_init=TORCH_LINEAR_KERNEL, bias_init=_torch_linear_bias(y.shape[-1]),
                 name="fc", **precision)(y)
    return y.astype(jnp.promote_types(self.dtype, jnp.float32))  # logits: float32 at least

  def _stem(self, x, conv, norm, pool_impl, backward=True):
    x = x.astype(self.dtype)
    if self.stem == "cifar":
      x = conv(self.stem_width, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)
      return norm(name="bn1")(x, relu=True)
    x = conv(self.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
    x = norm(name="bn1")(x, relu=True)
    return pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=pool_impl, backward=backward)


def _kernel_impl(conv_impl):
  """Batch norm and max pooling run on our CPU kernels where the convolutions may ('auto', 'kernel'); a
  portable conv impl ('xla', 'blockdiag', 'matmul') keeps the whole model in XLA's ops (see export.py)."""
  return "auto" if conv_impl in ("auto", "kernel") else "xla"


# ---------------------------------------------------------------------------------------------------
# Registry: every variant is one line of arguments.

_IMAGENET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _imagenet(depth, cardinality=1, base_width=64):
  return dict(stage_sizes=_IMAGENET_DEPTHS[depth], cardinality=cardinality, base_width=base_width)


def _cifar(cardinality, base_width, stage_sizes=(3, 3, 3), planes=(64, 128, 256), stem_width=64):
  return dict(stage_sizes=stage_sizes, cardinality=cardinality, base_width=base_width, planes=planes,
              stem="cifar", stem_width=stem_width, num_classes=10)


_MODELS = {
    "resnet50": _imagenet(50),
    "resnet101": _imagenet(101),
    "resnet152": _imagenet(152),
    # Table 2/3: the same complexity as ResNet-50 at cardinality 1, 2, 4, 8, 32.
    "resnext50_1x64d": _imagenet(50, 1, 64),
    "resnext50_2x40d": _imagenet(50, 2, 40),
    "resnext50_4x24d": _imagenet(50, 4, 24),
    "resnext50_8x14d": _imagenet(50, 8, 14),
    "resnext50_32x4d": _imagenet(50, 32, 4),
    "resnext101_32x4d": _imagenet(101, 32, 4),
    "resnext101_2x64d": _imagenet(101, 2, 64),
    "resnext101_32x8d": _imagenet(101, 32, 8),
    "resnext101_64x4d": _imagenet(101, 64, 4),
    "resnext152_32x4d": _imagenet(152, 32, 4),
    # Table 7: ResNeXt-29 on CIFAR (3 stages of 3 blocks, 64-wide 3x3 stem, no max-pool).
    "resnext29_8x64d": _cifar(8, 64),
    "resnext29_16x64d": _cifar(16, 64),
    # A CPU-sized ResNeXt (one block per stage, 16-wide stem) for the embedded digits demo and tests.
    "resnext11_4x16d": _cifar(4, 64, stage_sizes=(1, 1, 1), planes=(16, 32, 64), stem_width=16),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(ResNeXt) if f.name not in ("parent", "name"))


def stage_index(module_name):
  """0 for the stem ('conv1', 'bn1'), i for 'layer{i}_{j}', a large number for the classifier ('fc')."""
  if module_name in ("conv1", "bn1"):
    return 0
  if module_name.startswith("layer"):
    return int(module_name[len("layer"):].split("_")[0])
  return 1 << 30


def native_image_size(model):
  """The input size a model was designed for: 32 for the CIFAR stem, 224 for ImageNet."""
  return 32 if model.stem == "cifar" else 224


def list_models():
  """Names accepted by create_model, sorted."""
  return sorted(_MODELS)


def create_model(name, *, num_classes=None, dtype=jnp.float32, **overrides):
  """Builds a registered model; `overrides` replace any ResNeXt field (e.g. stage_sizes, conv_impl)."""
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
  unknown = sorted(set(overrides) - set(_FIELDS))
  if unknown:
    raise ValueError(f"unknown model option(s) {unknown}; allowed: {', '.join(_FIELDS)}")
  kwargs = {**_MODELS[name], "dtype": dtype, **overrides}
  if num_classes is not None:
    kwargs["num_classes"] = num_classes
  _validate(name, kwargs)
  return ResNeXt(**kwargs)


# ---------------------------------------------------------------------------------------------------
# From a training config, or from a checkpoint's meta (whose architecture fields are JSON: lists, not tuples).


def config_overrides(config) -> dict:
  """The architecture fields of `config` beyond the registry's: model_overrides, block_form, zero_init_last_bn,
  and drop_path_rate where it is not 0 (a training-time field: eval and predict run without it anyway).

  Training stores them in the checkpoint's meta, so that eval and predict rebuild the same architecture.
  """
  overrides = dict(config.model_overrides.items())
  overrides.setdefault("block_form", config.block_form)
  overrides.setdefault("zero_init_last_bn", config.zero_init_last_bn)
  if config.get("drop_path_rate", 0.0):
    overrides.setdefault("drop_path_rate", config.drop_path_rate)
  return overrides


def from_config(config, num_classes: int):
  """The model `config` trains (compute dtype from config.half_precision)."""
  return build(config.model, num_classes, config_overrides(config), conv_impl=config.conv_impl,
               half_precision=config.half_precision, frozen_stages=config.get("frozen_stages", 0))


def build(name, num_classes: int, overrides: dict, *, conv_impl="auto", half_precision=False, frozen_stages=0):
  """create_model for a config or a checkpoint's meta; an unknown name or impossible option is a ConfigError."""
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  dtype = jnp.bfloat16 if half_precision else jnp.float32
  try:
    return create_model(name, num_classes=num_classes, dtype=dtype, conv_impl=conv_impl,
                        frozen_stages=frozen_stages, **overrides)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _validate(name, kw):
  """Rejects shapes the architecture cannot have, with a message that says what is allowed."""
  stages, planes = tuple(kw["stage_sizes"]), tuple(kw.get("planes", (64, 128, 256, 512)))
  if not stages or any(n < 1 for n in stages):
    raise ValueError(f"{name}: stage_sizes must be positive block counts, got {stages}")
  if len(planes) < len(stages):
    raise ValueError(f"{name}: {len(stages)} stages need as many planes, got planes={planes}")
  if kw["cardinality"] < 1:
    raise ValueError(f"{name}: cardinality must be >= 1, got {kw['cardinality']}")
  d = min(planes) * kw["base_width"] // 64
  if d < 1:
    raise ValueError(f"{name}: base_width={kw['base_width']} gives a width per group of "
                     f"floor({min(planes)} * {kw['base_width']} / 64) = 0; it must be >= 1")
  if kw.get("num_classes", 1) < 1:
    raise ValueError(f"{name}: num_classes must be >= 1, got {kw['num_classes']}")
  if kw.get("block_form", "grouped") not in BLOCK_FORMS:
    raise ValueError(f"{name}: unknown block_form {kw['block_form']!r}; choose one of {BLOCK_FORMS}")
  if not 0 <= kw.get("frozen_stages", 0) <= len(stages) + 1:
    raise ValueError(f"{name}: frozen_stages must be in 0..{len(stages) + 1} (stem + {len(stages)} stages), "
                     f"got {kw['frozen_stages']}")
  if not 0 <= kw.get("drop_path_rate", 0.0) < 1:
    raise ValueError(f"{name}: drop_path_rate must be in [0, 1), got {kw['drop_path_rate']}")
  if kw.get("stem", "imagenet") not in ("imagenet", "cifar"):
    raise ValueError(f"{name}: unknown stem {kw['stem']!r}; choose 'imagenet' or 'cifar'")
