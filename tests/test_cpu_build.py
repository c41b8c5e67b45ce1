"""The CPU kernels' build: per-ISA targets, a remembered failure, the console report, other compilers and
architectures, and the kernel tests on every vector width this machine can execute."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from resnext_jax.cpu import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = ["tests/test_conv.py", "tests/test_batchnorm.py", "tests/test_pooling.py"]
KERNEL_SELECTION = "kernel or matches_xla or bfloat16 or sharded"  # their tests that run the kernels (-k)


def _python(code, **env):
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                        text=True, cwd=REPO)


def test_a_failed_build_is_tried_once_per_process_and_reported_once(tmp_path):
  """A compiler that fails: one build (one compile per source), one message, then every layer stays on XLA."""
  log = tmp_path / "calls"
  fake = tmp_path / "failing-c++"
  fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                  "case \"$*\" in *-dM*) exec g++ \"$@\";; esac\necho 'error: planted failure' >&2\nexit 1\n")
  fake.chmod(0o755)
  result = _python("""
      import concurrent.futures, jax, jax.numpy as jnp
      from resnext_jax import cpu, models
      cpu.prepare("auto")  # the jobs' background build, while other threads ask too
      with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert not any(pool.map(lambda _: cpu.available(), range(8)))
      m = models.create_model("resnext11_4x16d", num_classes=10)
      v = m.init(jax.random.key(0), jnp.ones((2, 16, 16, 3)))
      jax.grad(lambda p: m.apply({**v, "params": p}, jnp.ones((2, 16, 16, 3)), train=True,
                                 mutable=["batch_stats"])[0].sum())(v["params"])
      print(cpu.kernel_status())
      """, CXX=str(fake), RESNEXT_JAX_CACHE=str(tmp_path / "cache"))
  assert result.returncode == 0, result.stderr[-3000:]
  compiles = [l for l in log.read_text().splitlines() if " -c " in f" {l} "]
  sources = [f for f in os.listdir(build.CSRC) if f.endswith(".cc")]
  assert 1 <= len(compiles) <= len(sources), compiles
  assert result.stderr.count("planted failure") == 1 and result.stderr.count("portable XLA") == 1, result.stderr
  assert "not available" in result.stdout


def test_the_build_says_what_it_builds_and_how_long_it_took(tmp_path):
  """Also: a build started in the background (cpu.prepare, as the jobs do) is the one the first layer waits for."""
  result = _python("from resnext_jax import cpu; cpu.prepare(); print(cpu.kernel_status())",
                   RESNEXT_JAX_CACHE=str(tmp_path / "cache"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count("building the CPU kernels for this machine (-march=native") == 1, result.stderr
  assert "built the CPU kernels in" in result.stderr and "built for" in result.stdout
  again = _python("from resnext_jax import cpu; print(cpu.kernel_status())", RESNEXT_JAX_CACHE=str(tmp_path / "cache"))
  assert "building" not in again.stderr and again.stdout == result.stdout  # cached


def test_the_cache_key_follows_the_compilers_view_of_the_target(monkeypatch):
  """Two CPUs whose compilers predefine different ISA macros (how aarch64 machines differ too: they have no
  x86 'flags' line in /proc/cpuinfo) get different libraries."""
  key = build.library_key()
  flags, macros = build.target_flags(build.compiler())
  monkeypatch.setattr(build, "target_flags", lambda cxx: (flags, macros + "#define __ARM_FEATURE_SVE 1\n"))
  build.library_key.cache_clear()
  try:
    assert build.library_key() != key
  finally:
    build.library_key.cache_clear()


@pytest.mark.parametrize("march,isa", [("x86-64-v2", "generic"), ("x86-64-v3", "avx2"), ("x86-64-v4", "avx512")])
def test_kernel_tests_pass_on_every_isa_this_cpu_runs(march, isa, tmp_path):
  """The kernel equality tests (values and gradients vs XLA) for each vector width the CPU can execute.

  The rest of the suite runs the -march=native build; this runs the others (4 lanes with x86-64-v2, which
  also stands in for NEON's width; 8 with AVX2; 16 with AVX-512)."""
  if march not in build.executable_marches():
    pytest.skip(f"this CPU cannot execute {march} ({isa}): its kernels were not run here")
  native = _python("from resnext_jax.cpu import build; print(build.isa()[0])")
  if native.stdout.strip() == isa:
    pytest.skip(f"{isa} is this machine's native build, which the rest of the suite tests")
  env = dict(os.environ, RESNEXT_JAX_CPU_MARCH=march, RESNEXT_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  check = subprocess.run([sys.executable, "-c", "from resnext_jax.cpu import build; print(build.isa()[0])"],
                         env=env, capture_output=True, text=True, cwd=REPO)
  assert check.stdout.strip() == isa, check.stderr[-2000:]
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS,
                           "-k", KERNEL_SELECTION], env=env, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.skipif(not shutil.which("clang++"), reason="clang++ is not installed (.ci/run installs it)")
def test_clang_builds_the_kernels_and_they_match_xla(tmp_path):
  """grouped_conv.cc once used GCC-only builtins; clang (every Mac, many Linux boxes) must build it all."""
  env = dict(os.environ, CXX="clang++", RESNEXT_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/test_conv.py", "-k", "matches_xla_float32"], env=env, capture_output=True,
                          text=True, cwd=REPO)
  assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-g++"),
                    reason="no aarch64 cross-compiler (Debian's g++-aarch64-linux-gnu; .ci/run installs it)")
def test_every_kernel_compiles_for_arm(tmp_path):
  """NEON (4 floats, 32 registers): every source compiles for aarch64 (this machine cannot run it)."""
  import jax  # pylint: disable=g-import-not-at-top
  for source in sorted(f for f in os.listdir(build.CSRC) if f.endswith(".cc")):
    result = subprocess.run(["aarch64-linux-gnu-g++", "-O3", "-march=armv8-a", "-std=c++17", "-fPIC", "-Wall",
                             "-isystem", jax.ffi.include_dir(), "-c", os.path.join(build.CSRC, source),
                             "-o", str(tmp_path / f"{source}.o")], capture_output=True, text=True)
    assert result.returncode == 0, (source, result.stderr[-3000:])
    assert "warning" not in result.stderr, (source, result.stderr[-3000:])


def test_a_call_a_kernel_does_not_take_is_an_error_that_names_it():
  """Every kernel decodes the one generic FFI binding itself (csrc/ffi_call.h): operands, results or attributes
  it does not take give an error naming the kernel, never a crash or a silent misread."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not build.available():
    pytest.fail("the CPU kernels did not build on this machine")
  x, w = jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 16))
  geometry = dict(sh=np.int64(1), sw=np.int64(1), pt=np.int64(1), pl=np.int64(1))
  conv = jax.ffi.ffi_call(build.target("GroupedConvForward"), jax.ShapeDtypeStruct((1, 4, 4, 16), jnp.float32))
  np.testing.assert_allclose(np.asarray(conv(x, w, **geometry))[0, 1, 1], 9 * 16.0)  # 3x3 taps x 16 channels
  with pytest.raises(Exception, match="grouped_conv: called with 3 operands and 1 results"):
    jax.block_until_ready(conv(x, w, x, **geometry))
  with pytest.raises(Exception, match="grouped_conv: called with 2 operands"):  # an attribute missing
    jax.block_until_ready(conv(x, w, sh=np.int64(1), sw=np.int64(1), pt=np.int64(1)))
  stats = jax.ffi.ffi_call(build.target("BatchNormStats"), [jax.ShapeDtypeStruct((16,), jnp.float32)] * 2)
  np.testing.assert_allclose(np.asarray(stats(x)[0]), 16.0)
  with pytest.raises(Exception, match="batch_norm stats: called with 1 operands"):
    jax.block_until_ready(stats(x.astype(jnp.int32)))
  matmul = jax.ffi.ffi_call(build.target("MatMulForward"), jax.ShapeDtypeStruct((1, 4, 4, 16), jnp.float32))
  with pytest.raises(Exception, match="matmul forward: called with 2 operands"):  # weights must be [K, C]
    jax.block_until_ready(matmul(x, w[0]))
