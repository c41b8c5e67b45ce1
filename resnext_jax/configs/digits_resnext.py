"""The embedded demo: a small CIFAR-style ResNeXt (cardinality 4) on scikit-learn's handwritten digits.

No download (the data ships with scikit-learn); on 2 CPU cores it trains from scratch to >= 97% test top-1 in
a few minutes:  python main.py --config=configs/digits_resnext.py --workdir=/tmp/digits

`--config=configs/digits_resnext.py:tiny` shrinks the model further (two stages of widths 8 and 16, still
cardinality 4) for smoke tests and CI; with `--config.dataset=synthetic` it needs no data at all.
"""

import ml_collections

from resnext_jax.configs import default

# Two stages, 8/16 planes, 4 groups of width 4/8: compiles and trains in seconds on one CPU core.
TINY_MODEL = dict(stage_sizes=(1, 1), planes=(8, 16), stem_width=8, base_width=32)


def get_config(variant=None):
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
  c.rng_impl = "rbg"              # XLA:CPU compiles threefry initialisers slowly (30 s vs 4 s here)
  if variant == "tiny":
    c.model_overrides = ml_collections.ConfigDict(TINY_MODEL)
    c.image_size = 8
    c.synthetic_num_classes = 10
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of digits_resnext.py; the only one is 'tiny'")
  return c
