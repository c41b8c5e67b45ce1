"""libjpeg's DCT scaling, the rules both decode paths follow: the host's TF ops (transforms.py) and the device's
JAX (device_augment.py, which must not load TensorFlow). A JPEG window is decoded at 1/r, r the largest of
DCT_SCALES that keeps both its sides at least `decode_min_size`; the device averages r x r blocks to match."""

DCT_SCALES = (1, 2, 4, 8)  # decode at 1/r


def decode_min_size(size: int, antialias: bool) -> int:
  """The smallest side a window may be decoded at before the resize to `size`: size itself for bilinear (the
  remaining reduction is then under 2x, which bilinear handles), 2 * size with antialiasing (Pillow's
  `reducing_gap=2`: the DCT's box-like reduction then does at most half of the work, the filter the rest)."""
  return 2 * size if antialias else size


def dct_scale(h: int, w: int, min_size: int) -> int:
  """The r an h x w window is decoded at (transforms.dct_scale_index is the same rule as TF ops)."""
  return max(r for r in DCT_SCALES if min(h, w) >= r * min_size or r == 1)
