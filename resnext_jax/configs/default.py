"""Defaults shared by every config. Variants import this and override; any field can also be overridden
on the command line (`--config.batch_size=512`).

Public contract (do not rename): model, dataset, data_dir, num_epochs, batch_size, eval_batch_size,
learning_rate, seed, checkpoint_every_steps.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()

  # Model (resnext_jax.models registry name; number of classes comes from the dataset).
  c.model = "resnext50_32x4d"
  c.conv_impl = "auto"            # convolution implementation, see resnext_jax.layers.conv
  c.block_form = "grouped"        # paper Fig. 3: 'grouped' (c), 'concat' (b), 'split_sum' (a)
  c.zero_init_last_bn = False
  c.half_precision = False        # bfloat16 compute, float32 params and BN statistics
  c.model_overrides = ml_collections.ConfigDict()  # any other ResNeXt field, e.g. stage_sizes, planes

  # Data (resnext_jax.input_pipeline).
  c.dataset = "imagenet2012"      # imagenet2012 | cifar10 | cifar100 | sklearn_digits | imagefolder | synthetic
  # TFDS data_dir (None: TFDS's default); for 'imagefolder' the root holding split/label/*.jpg. A typed
  # placeholder, not None, so that --config.data_dir=... can set it.
  c.data_dir = config_dict.placeholder(str)
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.crop_ratio = 0.875            # eval: resize shorter side to image_size / crop_ratio, center-crop
  c.augment = "auto"              # auto (from dataset) | inception | cifar | none
  c.shuffle_buffer_size = 16_384
  c.cache = False
  c.prefetch = 2
  c.strict_decode = False         # imagefolder: raise on an undecodable file instead of skipping it
  c.antialias = False             # PIL's antialiased filter and torchvision's eval transform (slower; see docs)
  c.pre_resize = 0                # > 0: read a stored copy with shorter sides <= this (imagenet2012, imagefolder)
  c.pre_resize_quality = 90       # JPEG quality of that copy
  c.input_transform = "fast"      # fast | legacy (the previous transforms, for comparisons)
  c.decode_on_device = False      # decode JPEGs on the GPU (nvImageCodec; not yet run on a GPU)
  # Augmentation beyond the paper (issue 15; timm semantics; resnext_jax/datasets/augment.py).
  c.auto_augment = ""             # "" off | timm RandAugment string, e.g. "rand-m9-mstd0.5-inc1" | "trivial"
  c.reprob = 0.0                  # random erasing probability (timm RandomErasing, on the device after normalising)
  c.remode = "pixel"              # erasing fill: pixel (per-pixel N(0,1)) | rand (per box) | const (0)
  c.recount = 1                   # erasing boxes per image: uniform in 1..recount
  c.aug_repeats = 1               # repeated augmentation: each image k times per global batch (RepeatAugSampler)
  c.synthetic_num_classes = 1000  # synthetic mode only
  c.synthetic_num_examples = 50_000

  # Optimisation.
  c.batch_size = 256              # global, across all devices and processes
  c.eval_batch_size = 256
  c.num_epochs = 100.0            # durations are in epochs or steps; resnext_jax.optim.durations converts
  c.num_train_steps = -1          # > 0 overrides num_epochs
  c.stop_after_steps = -1         # > 0: checkpoint and stop at this step (time-sliced jobs); schedule unchanged
  c.learning_rate = 0.1           # peak learning rate for batch size lr_base_batch_size
  c.lr_base_batch_size = 256      # lr = learning_rate * batch_size / lr_base_batch_size; 0 disables scaling
  c.lr_schedule = "step"          # step | cosine
  c.lr_step_epochs = (30, 60, 90)
  c.lr_step_steps = ()            # non-empty overrides lr_step_epochs
  c.lr_decay_factor = 0.1
  c.warmup_epochs = 0.0
  c.warmup_steps = -1             # >= 0 overrides warmup_epochs
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.weight_decay_bn_and_bias = True  # the paper decays every parameter
  c.label_smoothing = 0.0
  c.grad_accum_steps = 1          # split each batch into this many micro-batches (same update, less memory)
  c.ema_decay = 0.0               # > 0 keeps and evaluates an EMA of the weights
  # Regularisation, loss and optimiser beyond the paper (issue 15; timm semantics).
  c.drop_path_rate = 0.0          # stochastic depth, linear over blocks (block i of N: rate * i / (N - 1))
  c.mixup_alpha = 0.0             # Mixup/CutMix in the train step (resnext_jax.mixing); both 0 = off
  c.cutmix_alpha = 0.0
  c.mix_prob = 1.0                # probability of mixing a batch at all
  c.mix_switch_prob = 0.5         # CutMix instead of Mixup, when both alphas are > 0
  c.loss = "softmax_cross_entropy"  # softmax_cross_entropy | bce (label_smoothing and mixing fold into targets)
  c.bce_target_threshold = 0.0    # bce: targets > threshold become 1, the rest 0 (A1: 0.2); 0 = none
  c.optimizer = "sgd"             # sgd | adamw | lamb | lars
  c.adam_b1 = 0.9                 # adamw, lamb
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.grad_clip_norm = 0.0          # > 0: clip the gradient by its global norm first; 0 = off

  # Bookkeeping.
  c.seed = 0
  c.rng_impl = "threefry2x32"     # jax.random key impl; 'rbg' compiles the initialisation ~8x faster on CPU
  c.log_every_steps = 100
  c.eval_every_epochs = 1.0       # 0: evaluate only at the end
  c.eval_every_steps = -1         # > 0 overrides eval_every_epochs
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.eval_checkpoint_step = -1     # eval mode: -1 = latest
  c.init_checkpoint = ""          # train: initial weights (fine-tuning); eval/predict: weights to use
  c.frozen_stages = 0             # fine-tuning: freeze the stem (1) and layer1..layer{k-1} (k); 0 trains all
  c.profile = False               # capture a profiler trace into the workdir (process 0)
  c.profile_first_step = 10
  c.profile_num_steps = 5
  c.top_k = 5                     # predict: classes printed per file
  # Evaluation tools (issue 15).
  c.eval_image_size = 0           # eval/predict resolution (FixRes); 0 = image_size. Resize to it / crop_ratio, crop
  c.eval_flip_tta = False         # eval: average the logits of each image and its horizontal flip
  c.eval_confusion_matrix = True  # eval mode and the final eval: [ema_]confusion_matrix.json/.png, per-class accuracy
  c.keep_best_checkpoints = 0     # > 0: also keep the k best evals' weights in WORKDIR/checkpoints_best
  c.best_checkpoint_metric = "top1"  # ranks them (highest wins): top1 | top5 | ema_top1 | ema_top5
  c.eval_checkpoint = "latest"    # eval/predict: 'latest' (WORKDIR/checkpoints) or 'best' (checkpoints_best)
  c.compilation_cache_dir = ""    # persistent XLA cache: "" = ~/.cache/resnext_jax/xla, "none" = off
  c.compilation_cache_min_compile_secs = 0.5  # cache programs that took at least this long to compile
  return c
