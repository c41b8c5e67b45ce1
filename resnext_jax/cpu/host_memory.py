"""Host memory: keep freed memory in the process, so that each step reuses the last step's pages.

A train step on CPU allocates several GB of activations (ResNeXt-50, batch 32: ~6 GB) and frees them at the
end. glibc's malloc serves blocks this large with mmap (or, in threads' arenas, always with mmap) and gives
them back to the kernel on free, so every step faults every page in again and the kernel zeroes it: measured
here, 1.45 million page faults and ~4 s of kernel CPU time per step, 40% of the step (docs/performance.md).
`retain_freed_memory()` tells glibc to serve all blocks from one heap and never return it: steps after the
first then touch no new pages. The process keeps its peak footprint, which a training job reaches every step
anyway. It is process-wide, so the entry points (main.py, the benchmark) call it, not the library.
"""

import ctypes
import ctypes.util
import sys

from absl import logging

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse; True if it took effect (Linux with glibc), else False.

  Call it first, before JAX or TensorFlow start threads: threads that already have their own malloc arena
  keep it, and a thread arena must still mmap every block larger than 64 MB.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  ok = all([mallopt(_M_ARENA_MAX, 1),        # one arena: no per-thread arenas that must mmap large blocks
            mallopt(_M_MMAP_MAX, 0),         # large blocks from the heap, not from mmap
            mallopt(_M_TRIM_THRESHOLD, -1)])  # -1 is SIZE_MAX to glibc: never shrink the heap
  if not ok:
    logging.warning("glibc rejected the malloc settings that keep freed memory; steps may fault pages in anew")
  return ok
