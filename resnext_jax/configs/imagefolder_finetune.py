"""Fine-tunes ImageNet weights (e.g. a converted torchvision ResNeXt-50) on an image folder.

  python main.py --config=configs/imagefolder_finetune.py --workdir=DIR \
      --config.data_dir=/data/flowers --config.init_checkpoint=/ckpt/resnext50_32x4d
data_dir holds train/<label>/*.jpg and val/<label>/*.jpg. The classifier is re-initialised when the number of
classes differs from the checkpoint's; everything else starts from the checkpoint. The stem stays frozen
(`--config.frozen_stages=2` freezes layer1 too, 0 trains everything). Cosine schedule, one epoch of warm-up.
"""

from resnext_jax.configs import imagenet_resnext50


def get_config():
  c = imagenet_resnext50.get_config()
  c.dataset = "imagefolder"
  c.train_split = "train"
  c.eval_split = "val"
  c.init_checkpoint = ""
  c.frozen_stages = 1
  c.batch_size = 64
  c.eval_batch_size = 64
  c.learning_rate = 0.01
  c.lr_base_batch_size = 256
  c.lr_schedule = "cosine"
  c.warmup_epochs = 1.0
  c.num_epochs = 20.0
  c.weight_decay = 1e-4
  c.weight_decay_bn_and_bias = False
  c.label_smoothing = 0.1
  c.shuffle_buffer_size = 10_000
  c.checkpoint_every_steps = 1000
  return c
