"""ImageNet-like JPEG files made locally, for measuring input pipelines without ImageNet.

Sizes follow ImageNet's train set: 70% of the images have a longer side of 500 pixels (Flickr's "medium" size),
a quarter are portrait, aspect ratios 4:3 first, then 3:2, 1:1, 5:4 and 16:9; a quarter are smaller (longer side
200-500) and 5% larger (600-2000 pixels), which is where decoding at reduced DCT scale pays. Heights x widths come
out at a mean near 400 x 450 and a median of 376 x 500. Content: colour noise with a natural-image (1/f)
spectrum, a few hard-edged shapes, a slight blur and sensor noise, saved at quality 90 with 4:2:0 chroma: about
3.8 bits per pixel (~90 kB per image), close to ImageNet's ~110 kB per image, so entropy decoding, which
dominates the cost of decoding, costs about what it costs on real photos. `describe` reports a folder's figures.
"""

import concurrent.futures
import io
import json
import multiprocessing
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Where the benchmarks keep the folders they make (resnext_jax.input_benchmark, benchmarks/input_pipeline_benchmark.py).
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "resnext_jax", "imagenet_like_jpegs")
_MAX_SYNTH = 640  # content is made at <= 640 px and upscaled: large camera images are smooth at pixel scale


def imagenet_size(rng: np.random.Generator) -> tuple[int, int]:
  """(height, width) drawn from an ImageNet-like distribution."""
  u = rng.uniform()
  if u < 0.70:
    longer = 500
  elif u < 0.95:
    longer = int(rng.uniform(200, 500))
  else:
    longer = int(np.exp(rng.uniform(np.log(600), np.log(2000))))
  aspect = rng.choice([0.75, 0.667, 1.0, 0.8, 0.5625], p=[0.5, 0.2, 0.1, 0.1, 0.1]) * rng.uniform(0.97, 1.03)
  shorter = max(32, int(round(longer * min(aspect, 1.0))))
  return (shorter, longer) if rng.uniform() < 0.75 else (longer, shorter)


def inception_box(rng: np.random.Generator, height: int, width: int, scale=(0.08, 1.0),
                  ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(y0, x0, y1, x1): torchvision's RandomResizedCrop sampling in numpy, the whole image after 10 misses. The
  crops the benchmarks' candidates without TensorFlow take (grain's PIL transform, the GPU decode check): the
  distribution of the host path's crops, whose own sampler is a TF op."""
  for _ in range(10):
    area = height * width * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= width and 0 < ch <= height:
      x, y = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
      return y, x, y + ch, x + cw
  return 0, 0, height, width


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 (height, width, 3) with a photo's spectrum, edges and noise (compresses like a photo)."""
  scale = max(height, width) / _MAX_SYNTH
  gh, gw = (height, width) if scale <= 1 else (int(round(height / scale)), int(round(width / scale)))
  fy, fx = np.fft.fftfreq(gh)[:, None], np.fft.rfftfreq(gw)[None, :]
  f = np.maximum(np.sqrt(fx ** 2 + fy ** 2), 1.0 / max(gh, gw))
  spectrum = (rng.standard_normal((3, *f.shape)) + 1j * rng.standard_normal((3, *f.shape))) * f ** -rng.uniform(
      0.8, 1.1)
  spectrum[:, 0, 0] = 0
  x = np.fft.irfft2(spectrum, s=(gh, gw), axes=(1, 2)).transpose(1, 2, 0)
  x = x @ np.array([[1, .8, .6], [.8, 1, .8], [.6, .8, 1]])  # correlated channels, as in photos
  x = (x - x.mean()) / (x.std() + 1e-6) * rng.uniform(40, 60) + 120 + rng.uniform(-30, 30, 3)
  image = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(2, 8)):
    x0, y0 = rng.uniform(-0.2, 1, 2) * (gw, gh)
    w, h = rng.uniform(0.05, 0.5, 2) * (gw, gh)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
  image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7)))
  if (gh, gw) != (height, width):
    image = image.resize((width, height), Image.BICUBIC)
  noisy = np.asarray(image, np.float32) + rng.standard_normal((height, width, 3), np.float32) * rng.uniform(1.5, 4)
  return np.clip(noisy, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def imagenet_like_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
  """One JPEG of an ImageNet-like size (imagenet_size) and content (photo_like)."""
  return encode_jpeg(photo_like(rng, *imagenet_size(rng)), quality)


def _seeded_jpeg(key) -> bytes:
  return imagenet_like_jpeg(np.random.default_rng(key))


def imagenet_like_jpegs(num_images: int, seed: int = 0) -> list[bytes]:
  """num_images ImageNet-like JPEGs in memory, image i drawn from the seed (seed, i), so the same files whatever the
  number of processes; made in spawned worker processes, one per core, once there are enough images. One takes 35
  ms on a Zen 4 core: 2,048 made serially took over a minute, device time on a lent GPU machine."""
  keys = [(seed, i) for i in range(num_images)]
  workers = min(os.cpu_count() or 1, num_images // 32)
  if workers <= 1:
    return [_seeded_jpeg(key) for key in keys]
  # Spawned, not forked: the caller may have started JAX's threads.
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    return list(pool.map(_seeded_jpeg, keys, chunksize=16))


def write_image_folder(root: str, num_images: int, *, num_classes: int = 10, splits=("train",), seed: int = 0,
                       quality: int = 90) -> dict:
  """Writes root/<split>/class<k>/<i>.jpg for each split (num_images each) unless root/synthetic_jpegs.json says
  the same folder is already there; returns describe(root)."""
  spec = dict(num_images=num_images, num_classes=num_classes, splits=list(splits), seed=seed, quality=quality,
              version=1)
  stamp = os.path.join(root, "synthetic_jpegs.json")
  if os.path.exists(stamp):
    with open(stamp) as f:
      if json.load(f).get("spec") == spec:
        return describe(root)
  for s, split in enumerate(splits):
    rng = np.random.default_rng([seed, s])
    for i in range(num_images):
      label = f"class{i % num_classes}"
      os.makedirs(os.path.join(root, split, label), exist_ok=True)
      with open(os.path.join(root, split, label, f"{i:06d}.jpg"), "wb") as f:
        f.write(imagenet_like_jpeg(rng, quality))
  stats = describe(root)
  with open(stamp, "w") as f:
    json.dump({"spec": spec, "stats": stats}, f)
  return stats


def describe(root: str) -> dict:
  """Mean size, file size and bits per pixel of the JPEGs under root (headers only)."""
  sizes, nbytes = [], []
  for dirpath, dirnames, names in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # not the prepared records (root/.tfds)
    for name in names:
      if name.lower().endswith((".jpg", ".jpeg")):
        path = os.path.join(dirpath, name)
        with Image.open(path) as im:
          sizes.append(im.size[::-1])
        nbytes.append(os.path.getsize(path))
  if not sizes:
    return {"num_files": 0}
  hw = np.asarray(sizes, np.float64)
  pixels = hw.prod(axis=1)
  return {"num_files": len(sizes), "mean_hw": [round(v) for v in hw.mean(0)],
          "median_hw": [round(v) for v in np.median(hw, 0)],
          "frac_shorter_side_ge_512": round(float((hw.min(1) >= 512).mean()), 3),
          "mean_kb": round(float(np.mean(nbytes)) / 1e3, 1),
          "bits_per_pixel": round(float(8 * np.sum(nbytes) / pixels.sum()), 2)}
