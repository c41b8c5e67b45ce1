"""How far our eval pixels are from torchvision's: mean absolute difference in grey levels (of 255).

torchvision's eval transform (PIL's decode, Resize(256), CenterCrop(224), run by torchvision itself) against ours
on ImageNet-like JPEGs (synthetic_jpegs: ImageNet's sizes, photo-like content), for the default transform, the
default with `antialias=True` (which is torchvision's transform, transforms.torchvision_eval_pixels) and the legacy
transforms; and the default and antialiased ones against the legacy ones. Needs torch and torchvision
(pip install -e '.[torch]'). One JSON line.

  python benchmarks/torchvision_parity.py --num_images 120
"""

import argparse
import io
import json
import os
import sys

# torchvision before TensorFlow: imported after it, torch crashes in this process.
import torchvision.transforms as T  # pylint: disable=g-bad-import-order

import numpy as np
from PIL import Image
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resnext_jax.datasets import legacy_transforms, synthetic_jpegs, transforms  # pylint: disable=wrong-import-position

_RAW = dict(mean=(0.0,) * 3, std=(1 / 255,) * 3)  # the legacy transforms' normalisation, undone


def eval_pixels(data: bytes, size: int, crop_ratio: float) -> dict:
  encoded = tf.constant(data)
  resize = T.Compose([T.Resize(int(np.floor(size / crop_ratio + 1e-6))), T.CenterCrop(size)])
  return {"torchvision": np.asarray(resize(Image.open(io.BytesIO(data)).convert("RGB"))),
          "default": transforms.eval_pixels(encoded, size=size, crop_ratio=crop_ratio).numpy(),
          "antialias": transforms.eval_pixels(encoded, size=size, crop_ratio=crop_ratio, antialias=True).numpy(),
          "legacy": legacy_transforms.eval_image(encoded, size=size, crop_ratio=crop_ratio, **_RAW).numpy()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=120)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--crop_ratio", type=float, default=0.875)
  args = parser.parse_args(argv)
  pairs = [("default", "torchvision"), ("antialias", "torchvision"), ("legacy", "torchvision"),
           ("default", "legacy"), ("antialias", "legacy")]
  diffs = {f"{a}_vs_{b}": [] for a, b in pairs}
  largest = 0
  for data in synthetic_jpegs.imagenet_like_jpegs(args.num_images):
    pixels = {k: v.astype(np.float64) for k, v in eval_pixels(data, args.image_size, args.crop_ratio).items()}
    for a, b in pairs:
      diffs[f"{a}_vs_{b}"].append(np.abs(pixels[a] - pixels[b]).mean())
    largest = max(largest, np.abs(pixels["antialias"] - pixels["torchvision"]).max())
  result = {"num_images": args.num_images, "image_size": args.image_size, "crop_ratio": args.crop_ratio,
            **{k: round(float(np.mean(v)), 3) for k, v in diffs.items()},
            "antialias_vs_torchvision_max": float(largest)}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
