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
import math
import os
import sys

# torchvision before TensorFlow: imported after it, torch crashes in this process. TensorFlow is imported only by
# main, so that a process without it can use torchvision_eval (tests/test_input_fast_decode.py does).
import torchvision.transforms as T  # pylint: disable=g-bad-import-order

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RAW = dict(mean=(0.0,) * 3, std=(1 / 255,) * 3)  # the legacy transforms' normalisation, undone


def torchvision_eval(data: bytes, size: int, crop_ratio: float | None) -> np.ndarray:
  """torchvision's eval transform on the PIL image, uint8 (size, size, 3): Resize(floor(size / crop_ratio)), then
  CenterCrop(size) (timm's crop_pct rule; 256 and 224 at 0.875, torchvision's reference), or Resize((size, size))
  where crop_ratio is None."""
  if crop_ratio is None:
    transform = T.Resize((size, size))
  else:
    transform = T.Compose([T.Resize(math.floor(size / crop_ratio + 1e-6)), T.CenterCrop(size)])
  return np.asarray(transform(Image.open(io.BytesIO(data)).convert("RGB")))


def eval_pixels(data: bytes, size: int, crop_ratio: float) -> dict:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from resnext_jax.datasets import legacy_transforms, transforms  # pylint: disable=import-outside-toplevel
  encoded = tf.constant(data)
  return {"torchvision": torchvision_eval(data, size, crop_ratio),
          "default": transforms.eval_pixels(encoded, size=size, crop_ratio=crop_ratio).numpy(),
          "antialias": transforms.eval_pixels(encoded, size=size, crop_ratio=crop_ratio, antialias=True).numpy(),
          "legacy": legacy_transforms.eval_image(encoded, size=size, crop_ratio=crop_ratio, **_RAW).numpy()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=120)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--crop_ratio", type=float, default=0.875)
  args = parser.parse_args(argv)
  sys.path.insert(0, REPO)
  from resnext_jax.datasets import synthetic_jpegs  # pylint: disable=import-outside-toplevel
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
