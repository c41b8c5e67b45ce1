"""ResNeXt-50 (32x4d) on ImageNet with "ResNet strikes back" procedure A2 (Wightman, Touvron, Jegou 2021,
arXiv:2110.00476, Table 1, column A2).

300 epochs at 224 (test 224, crop ratio 0.95), batch 2048, LAMB lr 5e-3, cosine with 5 warm-up epochs, weight
decay 0.02, no label smoothing, stochastic depth 0.05, repeated augmentation (3), RandAugment 7/0.5
('rand-m7-mstd0.5-inc1'), Mixup 0.1, CutMix 1.0, BCE loss (targets binarised at 0.2), mixed precision.
The whole table, its sources and what timm does where it is silent: imagenet_resnext50_rsb_a1.py.
"""

from resnext_jax.configs.imagenet_resnext50_rsb_a1 import rsb_config


def get_config():
  return rsb_config("a2")
