"""ResNeXt-50 (32x4d) on ImageNet with "ResNet strikes back" procedure A3 (Wightman, Touvron, Jegou 2021,
arXiv:2110.00476, Table 1, column A3).

100 epochs at train resolution 160, evaluated at 224 (eval_image_size: resize to 224 / 0.95 = 236, center 224;
the "FixRes" effect of random-resized-crop training), batch 2048, LAMB lr 8e-3, cosine with 5 warm-up epochs,
weight decay 0.02, no label smoothing, no stochastic depth, no repeated augmentation, RandAugment 6/0.5
('rand-m6-mstd0.5-inc1'), Mixup 0.1, CutMix 1.0, BCE loss (targets binarised at 0.2), mixed precision.
The whole table, its sources and what timm does where it is silent: imagenet_resnext50_rsb_a1.py.
A CPU-sized variant on the digits: digits_resnext_rsb_a3.py.
"""

from resnext_jax.configs.imagenet_resnext50_rsb_a1 import rsb_config


def get_config():
  return rsb_config("a3")
