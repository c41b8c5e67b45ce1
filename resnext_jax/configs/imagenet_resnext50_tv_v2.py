"""ResNeXt-50 (32x4d) on ImageNet with torchvision's "v2" recipe, the one behind its IMAGENET1K_V2 weights
(resnet50 80.86%, resnext50_32x4d 81.20% top-1 at val resize 232 / crop 224).

From torchvision's references/classification/README.md (ResNet/ResNeXt, "new recipe") and the blog post "How to
Train State-Of-The-Art Models Using TorchVision's Latest Primitives" (Vryniotis, 2021):

  torchrun --nproc_per_node=8 train.py --model $MODEL --batch-size 128 --lr 0.5 \
    --lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear \
    --auto-augment ta_wide --epochs 600 --random-erase 0.1 --weight-decay 0.00002 \
    --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0 \
    --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4

As set here: SGD momentum 0.9 (torchvision's default, no Nesterov), lr 0.5 for the global batch 1024 (8 x 128),
cosine over 600 epochs after 5 epochs of linear warm-up, weight decay 2e-5 and none on the BN parameters, label
smoothing 0.1, Mixup 0.2 or CutMix 1.0 (torchvision applies one of the two to every batch, each with probability
1/2: mix_prob 1, mix_switch_prob 0.5), TrivialAugmentWide (auto_augment='trivial'), random erasing with
probability 0.1 (torchvision's RandomErasing fills with 0: remode='const'), repeated augmentation with 4 repeats,
train crops at 176 (Inception-style random resized crop + flip), eval: resize the shorter side to 232, center 224
(eval_image_size 224, crop_ratio 224/232), an EMA of the weights. antialias=True: PIL's antialiased bilinear, as
torchvision's reference scripts resize PIL images, and torchvision's eval transform itself (within one grey level:
docs/input_pipeline.md), so that the published 81.20% compares. Its price is host CPU: the antialiased train
transform does ~0.4x the default's images per core (360-436 against 1,000-1,014 per CPU-second, 2-core Zen 4,
benchmarks/input_pipeline_benchmark.py); GPU hosts short of cores can set decode_on_device.

Differences, each stated: torchvision warms up from 0.01 x lr (--lr-warmup-decay 0.01), here from 0 (optim.py);
--norm-weight-decay 0 exempts only normalisation layers, weight_decay_bn_and_bias=False also exempts the one bias
(the classifier's); torchvision's EMA updates every 32 steps with decay 0.99998 adjusted to
1 - (1 - 0.99998) x 1024 x 32 / 600 = 0.998908 per update, here an EMA every step with the same time constant,
0.998908 ** (1/32) = 0.99996585; the train step runs in float32 (torchvision: float32 too, AMP off in the README
command) unless half_precision is set.
"""

from resnext_jax.configs import default


def get_config():
  c = default.get_config()
  c.model = "resnext50_32x4d"
  c.dataset = "imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 176               # --train-crop-size 176
  c.eval_image_size = 224          # --val-crop-size 224 (default)
  c.crop_ratio = 224 / 232         # --val-resize-size 232
  c.antialias = True               # torchvision's PIL resizes and eval transform
  c.augment = "inception"          # RandomResizedCrop + RandomHorizontalFlip
  c.auto_augment = "trivial"       # --auto-augment ta_wide
  c.reprob = 0.1                   # --random-erase 0.1
  c.remode = "const"
  c.recount = 1
  c.aug_repeats = 4                # --ra-sampler --ra-reps 4
  c.batch_size = 1024              # 8 GPUs x 128
  c.eval_batch_size = 1024
  c.optimizer = "sgd"
  c.learning_rate = 0.5
  c.lr_base_batch_size = 1024      # lr 0.5 is for batch 1024; scaled linearly for other batch sizes
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 2e-5
  c.weight_decay_bn_and_bias = False  # --norm-weight-decay 0.0
  c.lr_schedule = "cosine"
  c.warmup_epochs = 5.0
  c.num_epochs = 600.0
  c.label_smoothing = 0.1
  c.loss = "softmax_cross_entropy"
  c.mixup_alpha = 0.2
  c.cutmix_alpha = 1.0
  c.mix_prob = 1.0
  c.mix_switch_prob = 0.5
  c.drop_path_rate = 0.0
  c.grad_clip_norm = 0.0
  c.ema_decay = 0.99996585         # torchvision's --model-ema per step (see the docstring)
  c.best_checkpoint_metric = "ema_top1"  # torchvision reports the EMA weights
  c.keep_best_checkpoints = 1
  c.checkpoint_every_steps = 2500  # 1251 steps per epoch at batch 1024
  return c
