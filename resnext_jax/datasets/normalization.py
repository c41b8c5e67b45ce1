"""Per-channel normalisation statistics and the one normalisation formula (numpy only: no TensorFlow).

The host pipelines produce uint8 pixels; the device normalises them (input_pipeline), so the host does no float
work per pixel and ships 4x fewer bytes. `preprocess_eval_image` and the TF `transforms.normalize` use the same
float32 constants and formula, so a single image preprocessed on the host equals its batched, device-normalised
counterpart to float rounding.
"""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
DIGITS_MEAN = (0.306,) * 3  # over sklearn_digits 'train' at 32x32
DIGITS_STD = (0.324,) * 3


def normalization(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset), float32 (3,): pixels * scale + offset = (pixels / 255 - mean) / std."""
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize_numpy(pixels: np.ndarray, mean, std) -> np.ndarray:
  """uint8 (..., 3) -> float32, normalised."""
  scale, offset = normalization(mean, std)
  return pixels.astype(np.float32) * scale + offset
