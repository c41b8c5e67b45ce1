"""The embedded demo: a small CIFAR-style ResNeXt (cardinality 4) on scikit-learn's handwritten digits.

No download (the data ships with scikit-learn); on 2 CPU cores it trains from scratch to >= 97% test top-1 in
a few minutes:  python main.py --config=configs/digits_resnext.py --workdir=/tmp/digits
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = "resnext11_4x16d"     # 3x3 stem, 3 stages of one ResNeXt block, 4 groups of width 16/32/64
  c.dataset = "sklearn_digits"
  c.train_split = "train"         # 1,498 images
  c.eval_split = "test"           # 299 images
  c.image_size = 16
  c.augment = "none"
  c.shuffle_buffer_size = 2_000
  c.cache = True
  c.batch_size = 64
  c.eval_batch_size = 320
  c.learning_rate = 0.1
  c.lr_base_batch_size = 64
  c.lr_schedule = "cosine"
  c.warmup_epochs = 1.0
  c.num_epochs = 15.0
  c.weight_decay = 5e-4
  c.nesterov = True
  c.log_every_steps = 23           # one epoch
  c.eval_every_epochs = 5.0
  c.checkpoint_every_steps = 115  # five epochs
  c.keep_checkpoints = 2
  return c
