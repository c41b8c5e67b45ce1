"""ResNeXt-50 (32x4d) on ImageNet with the paper's recipe (Xie et al. 2017, Sec. 5.1).

SGD momentum 0.9, weight decay 1e-4 on every parameter, batch 256, lr 0.1 x batch/256 divided by 10 three
times (epochs 30, 60, 90 of 100), Inception-style crops to 224 with flips; eval: shorter side 256, center 224.
"""

from resnext_jax.configs import default


def get_config():
  c = default.get_config()
  c.model = "resnext50_32x4d"
  c.dataset = "imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.crop_ratio = 0.875
  c.augment = "inception"
  c.batch_size = 256
  c.eval_batch_size = 256
  c.learning_rate = 0.1
  c.lr_base_batch_size = 256
  c.lr_schedule = "step"
  c.lr_step_epochs = (30, 60, 90)
  c.num_epochs = 100.0
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.weight_decay_bn_and_bias = True
  c.checkpoint_every_steps = 5000
  return c
