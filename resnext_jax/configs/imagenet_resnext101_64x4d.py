"""ResNeXt-101 (64x4d) on ImageNet, the paper's recipe (Table 4/5: 20.4% top-1 error at 224)."""

from resnext_jax.configs import imagenet_resnext50


def get_config():
  c = imagenet_resnext50.get_config()
  c.model = "resnext101_64x4d"
  return c
