"""retain_freed_memory: a large block freed and allocated again reuses the same pages (no page faults)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CODE = """
import resource, sys
import numpy as np
from resnext_jax.cpu import host_memory
retained = host_memory.retain_freed_memory()
def faults_of_a_fresh_block():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = np.empty(2 ** 26, np.float32)  # 256 MB, far above glibc's mmap threshold
  block[:] = 1.0
  del block
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
first, second = faults_of_a_fresh_block(), faults_of_a_fresh_block()
print(retained, first, second)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_freed_block_is_reused_without_page_faults():
  out = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, cwd=REPO, check=True).stdout
  retained, first, second = out.split()
  assert retained == "True"
  assert int(first) > 0                 # the first use faults pages in (1 per 4 KB page, or per huge page)
  assert int(second) <= 16, out         # the second reuses them: nothing returned to the kernel in between
