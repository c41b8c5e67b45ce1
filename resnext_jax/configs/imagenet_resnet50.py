"""ResNet-50 baseline with the same recipe as ResNeXt-50 (Table 3: 23.9% top-1 error)."""

from resnext_jax.configs import imagenet_resnext50


def get_config():
  c = imagenet_resnext50.get_config()
  c.model = "resnet50"
  return c
