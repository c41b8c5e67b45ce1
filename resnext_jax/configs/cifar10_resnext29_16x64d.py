"""ResNeXt-29 (16x64d) on CIFAR-10, the paper's recipe (Table 7: 3.58% error)."""

from resnext_jax.configs import cifar10_resnext29_8x64d


def get_config():
  c = cifar10_resnext29_8x64d.get_config()
  c.model = "resnext29_16x64d"
  return c
