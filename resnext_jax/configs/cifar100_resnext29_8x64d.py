"""ResNeXt-29 (8x64d) on CIFAR-100, the paper's recipe (Table 7: 17.77% error)."""

from resnext_jax.configs import cifar10_resnext29_8x64d


def get_config():
  c = cifar10_resnext29_8x64d.get_config()
  c.dataset = "cifar100"
  return c
