"""ResNeXt-29 (8x64d) on CIFAR-10 with the paper's recipe (Sec. 5.3, Table 7: 3.65% error).

Pad to 40x40, random 32x32 crop, flip; batch 128, lr 0.1, momentum 0.9, weight decay 5e-4, 300 epochs,
lr divided by 10 at epochs 150 and 225.
"""

from resnext_jax.configs import default


def get_config():
  c = default.get_config()
  c.model = "resnext29_8x64d"
  c.dataset = "cifar10"
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = 32
  c.crop_ratio = 1.0
  c.augment = "cifar"
  c.shuffle_buffer_size = 50_000
  c.cache = True
  c.batch_size = 128
  c.eval_batch_size = 500
  c.learning_rate = 0.1
  c.lr_base_batch_size = 128
  c.lr_schedule = "step"
  c.lr_step_epochs = (150, 225)
  c.num_epochs = 300.0
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.checkpoint_every_steps = 3910  # 10 epochs
  return c
