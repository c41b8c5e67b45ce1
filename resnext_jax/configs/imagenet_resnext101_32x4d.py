"""ResNeXt-101 (32x4d) on ImageNet, the paper's recipe (Table 3/4: 21.2% top-1 error)."""

from resnext_jax.configs import imagenet_resnext50


def get_config():
  c = imagenet_resnext50.get_config()
  c.model = "resnext101_32x4d"
  return c
