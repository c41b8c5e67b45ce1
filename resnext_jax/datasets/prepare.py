"""Prepares pre-resized storage (datasets/pre_resized.py): a copy of a prepared dataset with every image's shorter
side at most N (as FFCV stores ImageNet), so that every epoch decodes fewer pixels and entropy-decodes fewer bytes.

  python -m resnext_jax.datasets.prepare --dataset=imagefolder --data_dir=/data/pets --pre_resize=256
  python -m resnext_jax.datasets.prepare --dataset=imagenet2012 --data_dir=~/tensorflow_datasets --pre_resize=320

then train with --config.pre_resize=256 (the same value); without the step, the first run prepares the copy itself.
Images already small enough are stored unchanged (their original bytes); larger ones are decoded, resized with
PIL's antialiased bicubic filter and saved as JPEG (--quality, default 90, 4:2:0). The copy is a TFDS dataset
`pre_resized` in the source's TFDS data_dir, with the same splits, labels and example order.

The accuracy trade-off (docs/input_pipeline.md): Inception crops are taken from the stored image, so a small
crop is upscaled from fewer source pixels (at N=256 a crop of 8% of the area has ~70 px to stretch to 224 instead
of ~110 at ImageNet's usual 375 px); the re-encode adds JPEG loss once. Evaluation at 256/224 is nearly
unaffected with N >= 256, since it resizes the shorter side to 256 anyway.
"""

import argparse
import json
import logging
import os

SUPPORTED = ("imagenet2012", "imagefolder")  # as pre_resized.SUPPORTED (not imported: it loads TFDS)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True, choices=SUPPORTED)
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir (imagenet2012) or the image folder's root")
  parser.add_argument("--pre_resize", type=int, required=True, help="largest shorter side stored, e.g. 256")
  parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the resized images")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  import ml_collections  # pylint: disable=import-outside-toplevel
  from resnext_jax.datasets import sources  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict(dict(
      dataset=args.dataset, data_dir=os.path.expanduser(args.data_dir), train_split="train",
      eval_split="validation", augment="auto", crop_ratio=0.875, strict_decode=False,
      pre_resize=args.pre_resize, pre_resize_quality=args.quality))
  builder = sources.get_builder(config)
  result = {"dataset": builder.name, "config": builder.builder_config.name, "data_dir": builder.data_dir,
            "splits": {name: split.num_examples for name, split in builder.info.splits.items()},
            "bytes": {name: split.num_bytes for name, split in builder.info.splits.items()}}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
