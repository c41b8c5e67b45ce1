"""'auto' that measures: the fastest implementation of each layer on this machine, timed once and cached.

Why: which implementation is fastest depends on the machine. Our kernels, tuned on an AVX-512 machine, ran
4x faster than XLA's formulations there and 10x slower on an AVX2 one (docs/performance.md); a table written
on one machine is wrong on another. So on a CPU, the first time a layer shape is traced, `choose` times every
candidate (forward and backward, the work of a train step; forward only for inference-only layers) with the
steps' compiler options (plus faster-compiling emitters, cpu/options.py) on a cut of the batch (`timing_images`),
taking turns so that the machine's slow moments fall on every candidate alike, keeps the fastest and caches
the choice beside the kernel library. The cache is keyed by this machine's kernel library (sources, compiler,
target ISA, jaxlib) and jax's version; later runs read it and time nothing.

- $RESNEXT_JAX_AUTOTUNE=off (or `using_table()`) uses each layer's recorded default instead of timing:
  deterministic and free, for tests and for tracing that only needs shapes (summary, init).
- Runs of several processes use the recorded defaults: every process must compile the same program, and
  hosts may time differently.
- Processes on one machine agree: a choice in the cache file is never replaced; a process that timed a layer
  another process has recorded meanwhile takes the recorded choice.
- `measure_layers(trace)` times every layer a trace meets together (the jobs trace their steps in it): all
  candidates of all layers compile side by side, rather than one layer's few at a time.
- `timed_if_it_pays(images)` marks layers that a job runs on only `images` images in all (the training job's
  evals): measure_layers times them only where that can repay the timing, else keeps the recorded defaults
  and records that they were not timed (a job that evaluates, e.g. evaluate.py, times them).
- `explain()` collects every decision (layer, candidates, milliseconds, reason) while a model is traced:
  `python -m resnext_jax.summary MODEL --explain` prints them.
"""

import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.cpu import build, options
from resnext_jax.errors import KernelUnavailable

MIN_IMAGES = 8            # images per timing, at least (the batch, if smaller) ...
MIN_PIXELS = 4096         # ... and enough for this many input pixels, up to the batch: see timing_images
MIN_SECONDS = 0.02        # a layer's candidates take at least 3 turns and this long each on average (best call counts)

_memory = {}              # signature (or an UNTIMED key) -> choice, this process
_explain_logs = []        # active explain() lists
_local = threading.local()  # .table: using_table() depth; .pending: measure_layers' dry pass; .images
UNTIMED = "untimed for "  # cache key 'untimed for N images <signature>': its default, as timing would not pay


def enabled():
  """Whether choices are timed here (a CPU backend, one process, not switched off)."""
  off = os.environ.get("RESNEXT_JAX_AUTOTUNE", "on").lower() in ("0", "off", "false", "table")
  return (not off and not getattr(_local, "table", 0) and jax.default_backend() == "cpu"
          and jax.process_count() == 1)


@contextlib.contextmanager
def using_table():
  """Within this block (this thread), every choice is the recorded default: nothing is timed."""
  _local.table = getattr(_local, "table", 0) + 1
  try:
    yield
  finally:
    _local.table -= 1


@contextlib.contextmanager
def timed_if_it_pays(images):
  """Within this block (this thread), layers run on about `images` images in the whole job; measure_layers
  times them only where that can repay the timing (see _pays_off)."""
  outer, _local.images = getattr(_local, "images", None), images
  try:
    yield
  finally:
    _local.images = outer


@contextlib.contextmanager
def explain():
  """Yields a list that receives one dict per decision taken while the block runs."""
  log = []
  _explain_logs.append(log)
  try:
    yield log
  finally:
    _explain_logs.remove(log)


def choose(op, candidates, args, default, *, batched=(0,), backward=True):
  """The name of the fastest of `candidates` ({name: fn(*args) -> array}) for arguments shaped like `args`.

  `op` names the layer kind ('conv grouped', 'batch_norm train', ...); the decision is keyed by it and the
  arguments' shapes and dtypes. `default` is the recorded choice, used where nothing is timed. `batched` are
  the positions of the arguments whose first axis is the batch (cut to `timing_images` for timing).
  """
  names = list(candidates)
  if default not in names:
    default = names[0]
  signature = _signature(op, args, backward)
  if len(names) == 1:
    return _decided(op, signature, names[0], "the only implementation that applies")
  if not enabled():
    return _decided(op, signature, default, _why_table())
  if signature in _memory:
    return _decided(op, signature, _memory[signature], "measured earlier in this process")
  cache = _read_cache()
  recorded = cache.get(signature)
  if recorded in names:
    _memory[signature] = recorded
    return _decided(op, signature, recorded, "measured on this machine before (cache)")
  job_images = getattr(_local, "images", None)
  untimed = _untimed_choice({**cache, **_memory}, signature, job_images)
  if untimed in names:
    return _decided(op, signature, untimed, f"recorded default, not timed: timing would not pay for this job's "
                    f"{job_images} images (decided before)")
  images = timing_images([a for i, a in enumerate(args) if i in batched])
  structs = [_shrink(a, images if i in batched else None) for i, a in enumerate(args)]
  pending = getattr(_local, "pending", None)
  if pending is not None:  # measure_layers' dry pass: timed with the others when the pass ends
    layer = _Pending(op, candidates, structs, backward, default, images, job_images)
    if pending.get(signature, layer).job_images is None:  # a layer of a step that always runs stays timed
      layer = layer._replace(job_images=None)
    pending[signature] = layer
    return default
  with concurrent.futures.ThreadPoolExecutor(1) as pool:  # outside the caller's trace (trace state is per thread)
    times = pool.submit(_time_layers, [(candidates, structs, backward)]).result()[0]
  return _keep_fastest(op, signature, times)


class _Pending(collections.namedtuple("_Pending", "op candidates structs backward default images job_images")):
  """A layer measure_layers' dry pass met: its candidates, the cut arguments (`images` of the batch) and, under
  timed_if_it_pays, the images the job runs it on (job_images; None: a layer of a step that always runs)."""


def measure_layers(trace):
  """trace() (tracing steps), with every layer it meets that needs timing timed together; returns its result.

  trace() runs first as a dry pass: choose() collects each layer it would time and answers the recorded
  default. Then every candidate of every collected layer is compiled in one pool over all cores and timed,
  one after another, and the choices are recorded; jax.clear_caches() drops the dry traces and trace() runs
  again, now taking the measured choices. Where nothing needed timing (cached, or measuring off) the dry pass
  was the real one: one trace, nothing dropped. Layers met under timed_if_it_pays are timed after the others,
  where _pays_off says so.

  Why: one layer's 2-4 candidates compiled at a time left a core idle most of the time (a grouped conv's
  'matmul' candidate compiles in 1.3-2.5 s, its 'kernel' in 0.1 s). The digits demo's 48 layers, 2-core AVX2
  EPYC: 26-30 s one by one, 23-26 s together (XLA's compiles already use both cores in part).
  """
  _local.pending = {}
  try:
    result = trace()
  finally:
    pending, _local.pending = _local.pending, None
  if not pending:
    return result
  start = time.perf_counter()
  always = [(sig, layer) for sig, layer in pending.items() if layer.job_images is None]
  occasional = [(sig, layer) for sig, layer in pending.items() if layer.job_images is not None]
  seconds_per_image = _time_and_keep(always)
  spent, timed = time.perf_counter() - start, len(always)
  if occasional and _pays_off(occasional, seconds_per_image, spent / max(len(always), 1), bool(always)):
    _time_and_keep(occasional)
    timed += len(occasional)
  logging.info("auto: timed %d layer shapes on this machine in %.1f s (cached in %s)", timed,
               time.perf_counter() - start, cache_path())
  jax.clear_caches()
  return trace()


def _time_and_keep(layers):
  """Times [(signature, _Pending)] together and records each fastest; returns the seconds per image of the
  fastest candidates, summed over the layers (what those layers cost one image)."""
  if not layers:
    return 0.0
  with concurrent.futures.ThreadPoolExecutor(1) as pool:  # outside any trace of the caller's
    times = pool.submit(_time_layers, [(l.candidates, l.structs, l.backward) for _, l in layers]).result()
  for (signature, layer), layer_times in zip(layers, times):
    _keep_fastest(layer.op, signature, layer_times)
  return sum(min(t.values()) / layer.images for (_, layer), t in zip(layers, times))


def _pays_off(occasional, seconds_per_image, seconds_per_layer, measured):
  """Whether timing the occasional layers ([(signature, _Pending)], run on job_images images in all) can save
  more than it costs; where not, records their defaults as untimed (UNTIMED keys: the same job run again does
  not weigh it again; a job that runs them more still times them).

  The saving is bounded by all the time the job spends in those layers, at most job_images x the per-image
  forward+backward time of the layers just timed (the train step's: the same layers with a backward pass). The
  cost is the time those layers took to time, per layer. Where nothing was timed alongside (no bound), they are
  timed. The digits demo (2-core AVX2 EPYC): 960 eval images, at most ~1 s in those layers, against ~9 s
  estimated (5-8 s measured: 48 shapes in 14.3-18.0 s, 24 in 8.6-9.7) to time the eval step's 24 layer
  shapes; cold demos 61-76 s instead of 70-79 s.
  """
  images = max(layer.job_images for _, layer in occasional)
  bound, cost = images * seconds_per_image, seconds_per_layer * len(occasional)
  if not measured or bound >= cost:
    return True
  why = (f"not timed: this job runs these {len(occasional)} layers on {images} images, at most ~{bound:.1f} s, "
         f"less than timing them would take (~{cost:.0f} s)")
  logging.info("auto: %d layer shapes keep their recorded defaults: %s", len(occasional), why)
  reason = f"recorded default: {why}"
  for signature, layer in occasional:
    key = f"{UNTIMED}{images} images {signature}"
    choice = _memory[key] = _record(key, layer.default)
    _decided(layer.op, signature, choice, reason)
  return False


def _untimed_choice(table, signature, images):
  """The default recorded as not worth timing for `signature` in a job of `images` images or more (timing pays
  still less on fewer), from `table` (the cache, this process's memory); None if none applies."""
  if images is None:
    return None
  for key, choice in table.items():
    if key.startswith(UNTIMED) and key.endswith(f" images {signature}"):
      recorded_images = key[len(UNTIMED):].split(" ", 1)[0]
      if recorded_images.isdigit() and images <= int(recorded_images):
        return choice
  return None


def _keep_fastest(op, signature, times):
  """Records the fastest of `times` ({name: seconds}) unless another process recorded a choice first."""
  fastest = min(times, key=times.get)
  choice = _record(signature, fastest)
  _memory[signature] = choice
  reason = "measured now" if choice == fastest else "recorded by another process meanwhile"
  return _decided(op, signature, choice, reason, times)


def _signature(op, args, backward):
  shapes = " ".join(f"{jnp.dtype(a.dtype).name}{list(a.shape)}" for a in args)
  return f"{op} {'fwd+bwd' if backward else 'fwd'} {shapes}"


def _why_table():
  if jax.default_backend() != "cpu":
    return f"recorded default for {jax.default_backend()} (measuring is for CPUs)"
  if jax.process_count() > 1:
    return "recorded default (several processes must compile the same program)"
  return "recorded default (measuring switched off)"


def _decided(op, signature, choice, reason, times=None):
  for log in _explain_logs:
    log.append(dict(op=op, signature=signature, choice=choice, reason=reason,
                    ms={k: round(v * 1e3, 3) for k, v in (times or {}).items()}))
  return choice


def timing_images(batched_args):
  """How many images of the batch a layer is timed on: MIN_IMAGES, or more where its maps are small, so that
  it sees at least MIN_PIXELS input pixels (NHWC); never more than the batch.

  Why: which implementation is fastest depends on how much work a call has to spread over the cores and the
  kernels' register tiles, and a small map at 8 images is not the same problem as at the real batch. The digits
  model's last grouped conv (8x8 -> 4x4, 256 channels, groups of 64; 2-core AVX2 EPYC, forward+backward):
  at 8 images 'kernel' 2.07 ms, 'blockdiag' 1.39, 'matmul' 2.01; at its batch of 64: 9.69, 11.59, 9.18 ms,
  so the choice made at 8 images was the slowest at 64. Large maps keep 8 images (resnext50_32x4d at 224:
  8 for 56x56 and 28x28, 21 for 14x14, the whole batch for 7x7), which bounds the time spent measuring.
  """
  shape = next((a.shape for a in batched_args if a.ndim), None)
  if shape is None:
    return MIN_IMAGES
  pixels = shape[1] * shape[2] if len(shape) == 4 else MIN_PIXELS
  return min(shape[0], max(MIN_IMAGES, -(-MIN_PIXELS // max(pixels, 1))))


def _shrink(a, images):
  shape = (min(a.shape[0], images), *a.shape[1:]) if images is not None and a.ndim else a.shape
  return jax.ShapeDtypeStruct(shape, a.dtype)


def _time_layers(layers):
  """Seconds per candidate for each of `layers` ([(candidates, structs, backward)]): every candidate compiled
  side by side (compiling dominates; XLA compiles without the GIL), then each layer's candidates timed taking
  turns, on random arguments made one layer at a time."""
  operands = [_operands(next(iter(c.values())), structs, backward) for c, structs, backward in layers]
  jobs = [(i, name, fn) for i, (candidates, _, _) in enumerate(layers) for name, fn in candidates.items()]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    compiled = list(pool.map(lambda job: _compile(job[2], operands[job[0]], layers[job[0]][2]), jobs))
  executables = [{} for _ in layers]
  for (i, name, _), executable in zip(jobs, compiled):
    executables[i][name] = executable
  return [_seconds(layer, _random(layer_operands)) for layer, layer_operands in zip(executables, operands)]


def _operands(fn, structs, backward):
  """The arguments, and with `backward` the output's cotangent (an argument: as a closed-over constant XLA
  would fold it for minutes)."""
  if not backward:
    return structs
  return [*structs, jax.ShapeDtypeStruct(jax.eval_shape(fn, *structs).shape, jnp.float32)]


def _random(structs):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal(s.shape, np.float32), s.dtype) for s in structs]


def _compile(fn, operands, backward):
  """fn (with `backward`: the gradient of <fn(*args), cotangent>, the last operand) compiled with the steps'
  options, and emitters that compile faster and run the same (options.timing_options)."""
  run = fn
  if backward:
    loss = lambda *a: jnp.vdot(fn(*a[:-1]).astype(jnp.float32), a[-1])
    run = jax.grad(loss, argnums=tuple(range(len(operands) - 1)))
  return jax.jit(run, compiler_options=options.timing_options()).lower(*operands).compile()


def _seconds(executables, arrays):
  """{name: best wall time of one call} for executables ({name: compiled}) taking turns on the same arguments,
  after one untimed call each: at least 3 turns, and MIN_SECONDS per candidate in all.

  Why turns: this machine's speed drifts by 20% and more within seconds (docs/performance.md); timed one after
  another, a slow spell would count against whichever candidate it fell on.
  """
  for compiled in executables.values():
    jax.block_until_ready(compiled(*arrays))
  best = dict.fromkeys(executables, float("inf"))
  spent, turns = 0.0, 0
  while turns < 3 or spent < MIN_SECONDS * len(executables):
    for name, compiled in executables.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*arrays))
      elapsed = time.perf_counter() - start
      best[name], spent = min(best[name], elapsed), spent + elapsed
    turns += 1
  return best


def cache_path():
  """The choices file for this machine, kernel library and jax version."""
  try:
    machine = build.library_key()
  except KernelUnavailable:  # no kernels here: the portable choices still depend on the CPU
    machine = hashlib.sha256(_cpu_identity().encode()).hexdigest()[:16]
  key = hashlib.sha256(f"{machine} {jax.__version__}".encode()).hexdigest()[:16]
  return os.path.join(build.cache_dir(), f"autotune_{key}.json")


def _cpu_identity():
  try:
    with open("/proc/cpuinfo") as f:
      return "".join(sorted({l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))}))
  except OSError:
    import platform  # pylint: disable=g-import-not-at-top
    return platform.platform() + platform.processor()


def _read_cache():
  try:
    with open(cache_path()) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _record(signature, choice):
  """Adds signature -> choice to the cache file unless present; returns the choice now recorded."""
  path = cache_path()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    table = _read_cache()
    if signature in table:
      return table[signature]
    table[signature] = choice
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(table, f, indent=0, sort_keys=True)
    os.replace(tmp, path)
  return choice
