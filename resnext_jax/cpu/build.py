"""Our C++ CPU kernels (csrc/*.cc), built on first use for this machine's ISA and registered as XLA FFI targets.

- Target: `-march=native` by default, or $RESNEXT_JAX_CPU_MARCH (e.g. `x86-64-v3` builds and runs the AVX2
  kernels on an AVX-512 machine, `x86-64-v2` the 4-lane ones). csrc/vec.h picks the vector width and the
  kernels their register tiles from what the compiler targets: 16 floats and 32 registers for AVX-512, 8 and
  16 for AVX2, 4 and 32 for NEON. Building at first use keeps `pip install` pure Python and the binary matched
  to the host CPU and jaxlib.
- Build: one translation unit per core, compiled in parallel, then linked; the console says that it is building
  and how long it took. With fewer cores than sources, sources share a unit (`_translation_units`).
- Cache: ~/.cache/resnext_jax (or $RESNEXT_JAX_CACHE), keyed by the sources, the compiler and its flags, the
  compiler's own view of the target (its predefined macros for those flags: the ISA extensions on x86 and Arm
  alike, where /proc/cpuinfo differs between architectures) and jaxlib's version.
- Failure (no compiler, a compiler error) is remembered for the process: one failed build at most, reported
  once; `available()` is then False and the layers use their portable XLA implementations.
- `load_in_background()` starts the build in a thread, so that it overlaps the job's other start-up work; the
  first kernel that needs the library waits for it (one lock: never two builds in one process).
"""

import concurrent.futures
import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jaxlib

from resnext_jax.errors import KernelUnavailable

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# Exported handler symbol -> FFI target name, for every kernel in csrc/.
TARGETS = {
    "GroupedConvForward": "resnext_jax_grouped_conv_forward",
    "GroupedConvInputGrad": "resnext_jax_grouped_conv_input_grad",
    "GroupedConvKernelGrad": "resnext_jax_grouped_conv_kernel_grad",
    "BatchNormStats": "resnext_jax_batch_norm_stats",
    "BatchNormApply": "resnext_jax_batch_norm_apply",
    "BatchNormGradStats": "resnext_jax_batch_norm_grad_stats",
    "BatchNormGradApply": "resnext_jax_batch_norm_grad_apply",
    "MaxPoolForward": "resnext_jax_max_pool_forward",
    "MaxPoolBackward": "resnext_jax_max_pool_backward",
    "MatMulForward": "resnext_jax_matmul_forward",
    "MatMulKernelGrad": "resnext_jax_matmul_kernel_grad",
}


def available():
  """Whether the kernels are built and registered (builds them on the first call of the process)."""
  try:
    load()
    return True
  except KernelUnavailable:
    return False


class LoadOnce:
  """load()'s result, computed once per process behind a lock, so that concurrent first callers wait instead of
  building again; a KernelUnavailable is said once on the console with what runs instead (`fallback`), then
  raised again on every later call without building again: one failed build per process at most. The CPU
  kernels and the input pipeline's resize op load through one each."""

  def __init__(self, load, fallback):
    self._load, self._fallback = load, fallback
    self._lock, self._result, self._failure = threading.Lock(), None, None

  def __call__(self):
    with self._lock:
      if self._failure is not None:
        raise self._failure
      if self._result is None:
        try:
          self._result = self._load()
        except KernelUnavailable as e:
          self._failure = e
          print(f"resnext_jax: {e}\nresnext_jax: {self._fallback}", file=sys.stderr, flush=True)
          raise
      return self._result


def load():
  """Builds (or finds in the cache) the library and registers its FFI targets; once per process.

  A cached library that does not load (a damaged file) is rebuilt once. A failure is raised again on every
  later call without building again.
  """
  return _load_once()


def load_in_background():
  """Starts `available()` in a daemon thread and returns it: the build (compilers in subprocesses) then runs while
  the caller imports TensorFlow and prepares data, single-threaded work that leaves the other cores idle."""
  thread = threading.Thread(target=available, name="resnext_jax-cpu-kernels", daemon=True)
  thread.start()
  return thread


def _load():
  path, lib = load_rebuilding_once(build, ctypes.cdll.LoadLibrary, OSError, "the CPU kernels")
  for symbol, name in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  lib.ResnextJaxIsa.restype = ctypes.c_char_p
  return path, lib.ResnextJaxIsa().decode(), int(lib.ResnextJaxLanes())


_load_once = LoadOnce(_load, "using the portable XLA implementations instead")


def load_rebuilding_once(build_fn, load_fn, errors, purpose):
  """(path, load_fn(path)) of build_fn()'s cached library; one that does not load (a damaged file) is deleted and
  built again once, then KernelUnavailable."""
  path = build_fn()
  try:
    return path, load_fn(path)
  except errors:
    os.unlink(path)
  path = build_fn()
  try:
    return path, load_fn(path)
  except errors as e:
    raise KernelUnavailable(f"cannot load {purpose} {path}: {e}") from e


def build_beside(path, purpose, detail, compile_into):
  """Makes `path` with compile_into(tmp) -> a file in a temporary directory beside it, then renames it (safe
  when processes build at once), saying on the console that it builds `purpose` (`detail`) and how long it took."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  print(f"resnext_jax: building {purpose} {detail} ...", file=sys.stderr, flush=True)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
    os.replace(compile_into(tmp), path)
  print(f"resnext_jax: built {purpose} in {time.perf_counter() - start:.1f} s: {path}", file=sys.stderr, flush=True)
  return path


def target(symbol):
  """The registered FFI target name of handler `symbol` (builds and registers the kernels on first use)."""
  load()
  return TARGETS[symbol]


def isa():
  """(ISA name, floats per vector) the loaded library was compiled for, e.g. ('avx2', 8)."""
  _, name, lanes = load()
  return name, lanes


def march():
  """The -march the kernels are built for: $RESNEXT_JAX_CPU_MARCH, or 'native'."""
  return os.environ.get("RESNEXT_JAX_CPU_MARCH") or "native"


def executable_marches():
  """x86-64 micro-architecture levels this CPU can run (e.g. ['x86-64-v2', 'x86-64-v3']); [] elsewhere.

  Lets the tests run the kernels built for every vector width the machine can execute, not only its own.
  """
  if platform.machine() not in ("x86_64", "AMD64"):
    return []
  flags = _cpu_flags()
  levels = [("x86-64-v2", {"sse4_2", "popcnt", "ssse3"}),
            ("x86-64-v3", {"avx2", "fma", "bmi2", "f16c", "movbe"}),
            ("x86-64-v4", {"avx512f", "avx512bw", "avx512dq", "avx512vl"})]
  return [name for name, needed in levels if needed <= flags]


def _cpu_flags():
  try:
    with open("/proc/cpuinfo") as f:
      return next((set(l.split(":", 1)[1].split()) for l in f if l.startswith("flags")), set())
  except OSError:
    return set()


def compiler(purpose="the CPU kernels"):
  """The C++ compiler to build `purpose` with: $CXX, else g++, c++ or clang++ on the PATH."""
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if not cxx:
    raise KernelUnavailable(f"no C++ compiler found (set CXX, or install g++ or clang++) to build {purpose}")
  return cxx


def run(cmd):
  """A compiler command's CompletedProcess (an OSError, e.g. a missing binary, as a failed one)."""
  try:
    return subprocess.run(cmd, capture_output=True, text=True)
  except OSError as e:
    return subprocess.CompletedProcess(cmd, 1, "", str(e))


def target_flags(cxx, purpose="the CPU kernels"):
  """Flags that select the target ISA, and the compiler's predefined macros for them (the cache's CPU key).

  `-march=native` where the compiler takes it (GCC everywhere, clang on x86 and recent Arm), else
  `-mcpu=native` (older clang on Arm).
  """
  choices = [[f"-march={march()}"]] if march() != "native" else [["-march=native"], ["-mcpu=native"]]
  for flags in choices:
    probe = run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull])
    if probe.returncode == 0:
      return flags, probe.stdout
  raise KernelUnavailable(f"building {purpose} with {cxx} failed: it rejects {choices[0][0]}:\n"
                          f"{probe.stderr[-2000:]}")


def cache_dir():
  return os.environ.get("RESNEXT_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resnext_jax")


@functools.cache
def library_key():
  """Hex digest naming the library for these sources, compiler, flags, target and jaxlib."""
  cxx = compiler()
  flags, macros = target_flags(cxx)
  identity = [" ".join([cxx, *flags, *_FLAGS]).encode(), macros.encode(), jaxlib.__version__.encode()]
  for path in sorted(glob.glob(os.path.join(CSRC, "*.*"))):  # sources and headers
    with open(path, "rb") as f:
      identity += [os.path.basename(path).encode(), f.read()]
  return hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]


_FLAGS = ["-O3", "-std=c++17", "-fPIC"]


def build():
  """Path of the compiled library for this machine; compiles it if it is not in the cache."""
  cxx = compiler()
  path = os.path.join(cache_dir(), f"cpu_kernels_{library_key()}.so")
  if os.path.exists(path):
    return path
  flags, _ = target_flags(cxx)

  def compile_into(tmp):
    library = os.path.join(tmp, "kernels.so")
    check(run([cxx, "-shared", *_compile_all(cxx, flags, tmp), "-o", library]), cxx, "linking")
    return library

  return build_beside(path, "the CPU kernels", f"for this machine ({' '.join(flags)}, {cxx})", compile_into)


def _compile_all(cxx, isa_flags, out_dir):
  """The sources as one translation unit per core (at most one per source), compiled in parallel."""
  sources = sorted(glob.glob(os.path.join(CSRC, "*.cc")), key=os.path.getsize, reverse=True)
  units = _translation_units(sources, min(len(sources), os.cpu_count() or 1), out_dir)
  include = f"-isystem{jax.ffi.include_dir()}"  # its headers warn; ours do not
  commands = {name: [cxx, *_FLAGS, *isa_flags, include, "-c", unit, "-o", os.path.join(out_dir, f"{i}.o")]
              for i, (name, unit) in enumerate(units.items())}
  with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
    results = dict(zip(commands, pool.map(run, commands.values())))
  for name, result in results.items():
    check(result, cxx, name)
  return [cmd[-1] for cmd in commands.values()]


def _translation_units(sources, count, out_dir):
  """{name: a .cc to compile}: `sources` (largest first) dealt into `count` units in snake order (1..n, n..1,
  ...), a unit of several being a file in out_dir that #includes them (each keeps its code in its own namespace).

  Why: a source's compile is ~2-3 s of parsing the FFI header plus its own code; sharing a unit parses the
  header once. On 2 cores (2-core AVX2 EPYC, -O3): 4 units 23.9 s of CPU and 11.9 s of wall time, 2 units
  18.2 s and 9.9 s; and less CPU taken from TensorFlow's import, which the build overlaps.
  """
  groups = [[] for _ in range(count)]
  for i, src in enumerate(sources):
    lap, seat = divmod(i, count)
    groups[seat if lap % 2 == 0 else count - 1 - seat].append(src)
  units = {}
  for i, group in enumerate(groups):
    name = "+".join(os.path.basename(src) for src in group)
    if len(group) == 1:
      units[name] = group[0]
      continue
    unit = os.path.join(out_dir, f"unit{i}.cc")
    with open(unit, "w") as f:
      f.writelines(f'#include "{src}"\n' for src in group)
    units[name] = unit
  return units


def check(result, cxx, what, purpose="the CPU kernels"):
  """KernelUnavailable naming `purpose`, the compiler and the step (`what`) where a compiler command failed."""
  if result.returncode != 0:
    raise KernelUnavailable(f"building {purpose} with {cxx} failed ({what}):\n{result.stderr[-2000:]}")
