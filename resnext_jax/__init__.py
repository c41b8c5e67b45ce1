"""ResNeXt (Xie et al., CVPR 2017) in JAX/Flax: models, torchvision weights, input pipelines, training."""

__version__ = "0.1.0"
