"""config.decode_on_device's device half, measured without TensorFlow: nvImageCodec's batch decode and the device
crop, resize, flip and normalisation (gpu_decode.augment_batch) over ImageNet-like JPEGs held in memory.

Made for a GPU machine that has JAX but no TensorFlow (the host half, tf.data's records and boxes, needs it): one
command says whether the decode is right and fast enough for the step.

  pip install 'nvidia-nvimgcodec-cu13[nvjpeg]'        # or -cu12, as JAX's CUDA
  python benchmarks/gpu_decode_benchmark.py --num_images 2048 --batch_size 256 --model resnext50_32x4d

  RESNEXT_JAX_DECODE_BACKEND=cpu python benchmarks/gpu_decode_benchmark.py --num_images 16 --batch_size 8  # dry run

Reports: agreement with PIL's decode of the same files (nvImageCodec's IDCT may differ by a few grey levels);
decode-only images/s; decode + augment images/s on the first pass (the small per-image window program compiles
once per pooled buffer size and DCT scale: the number of image sizes and of programs compiled is printed) and on
a second pass (compiled). With --model, the loop on the device as well: the job's train step (--config's recipe,
--dtype) fed by the decode and augmentation, against the step alone on a synthetic batch in the same run
(`loop_over_step`, the issue's 90% mark but for tf.data's host work; and that its batches equal those augmented
one at a time, which a pooled buffer reused too early would break). Then one JSON line. Crop boxes and flips
come from torchvision's RandomResizedCrop sampling in numpy: the host path's distribution (TF's own sampler needs
TensorFlow).
"""

import argparse
import io
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from resnext_jax import errors  # pylint: disable=wrong-import-position
from resnext_jax.datasets import device_augment  # pylint: disable=wrong-import-position
from resnext_jax.datasets import gpu_decode  # pylint: disable=wrong-import-position
from resnext_jax.datasets import normalization  # pylint: disable=wrong-import-position
from resnext_jax.datasets import synthetic_jpegs  # pylint: disable=wrong-import-position


def header_sizes(jpegs: list[bytes]) -> list[tuple[int, int]]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return [Image.open(io.BytesIO(data)).size[::-1] for data in jpegs]


def agreement_with_pil(jpegs: list[bytes]) -> dict:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  diffs = []
  for data, image in zip(jpegs, gpu_decode.decode(jpegs)):
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    got = np.asarray(image.pixels(), np.int16)
    if got.shape != reference.shape:
      raise AssertionError(f"decoded shape {got.shape}, PIL's {reference.shape}")
    diffs.append(np.abs(got - reference))
  return {"max_abs_diff_vs_pil": int(max(d.max() for d in diffs)),
          "mean_abs_diff_vs_pil": round(float(np.mean([d.mean() for d in diffs])), 3)}


def images_per_s(fn, batches) -> float:
  count, start = 0, time.perf_counter()
  for batch in batches:
    jax.block_until_ready(fn(batch))
    count += len(batch[0])
  return count / (time.perf_counter() - start)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--antialias", action="store_true")
  parser.add_argument("--model", default="", help="also the loop on the device: this model's train step fed by the "
                      "decode and augmentation, against the step alone")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  parser.add_argument("--config", default="imagenet_resnext50", help="the step's recipe (resnext_jax.benchmark)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps on the synthetic batch")
  parser.add_argument("--loop_passes", type=int, default=2, help="timed passes of the loop over the images")
  args = parser.parse_args(argv)
  gpu_decode.check_device()

  jpegs = synthetic_jpegs.imagenet_like_jpegs(args.num_images)
  sizes = header_sizes(jpegs)
  rng = np.random.default_rng(1)
  boxes = np.array([synthetic_jpegs.inception_box(rng, h, w) for h, w in sizes], np.int32)
  flips = rng.uniform(size=len(jpegs)) < 0.5
  starts = range(0, len(jpegs) - args.batch_size + 1, args.batch_size)
  batches = [(jpegs[i:i + args.batch_size], boxes[i:i + args.batch_size], flips[i:i + args.batch_size])
             for i in starts]
  if not batches:
    raise SystemExit(f"--num_images {args.num_images} holds no batch of --batch_size {args.batch_size}")

  def augment(batch):
    return gpu_decode.augment_batch(*batch, size=args.image_size, mean=normalization.IMAGENET_MEAN,
                                    std=normalization.IMAGENET_STD, antialias=args.antialias)

  result = {"backend": gpu_decode.backend(), "pooled_buffers": gpu_decode.pooled(),
            "device": str(jax.devices()[0].device_kind),
            "num_images": len(jpegs), "distinct_sizes": len(set(sizes)), "batch_size": args.batch_size,
            **agreement_with_pil(jpegs[:16])}
  result["decode_images_per_s"] = round(images_per_s(lambda b: gpu_decode.decode(b[0]), batches), 1)
  result["augment_images_per_s_first_pass"] = round(images_per_s(augment, batches), 1)
  result["programs_compiled"] = {name: getattr(device_augment, name)._cache_size()  # pylint: disable=protected-access
                                 for name in ("window", "resize_windows")}
  result["augment_images_per_s"] = round(images_per_s(augment, batches), 1)
  if args.model:
    result.update(loop_against_step(args, batches, augment))
  print(json.dumps(result))
  return result


def loop_against_step(args, batches, augment) -> dict:
  """The job's train step alone (its synthetic batch), then the loop on the device: each batch decoded,
  augmented and fed to the step, over `--loop_passes` passes (the window programs already compiled). Their ratio
  is the full loop's share of the step's images/s, but for tf.data's host work (reading records, JPEG headers,
  boxes), which this machine may lack TensorFlow to run. One device. Also checks that the loop's first batches
  equal the same batches augmented alone (`loop_batches_max_abs_diff_vs_alone`, 0 when right): in the loop, each
  decode reuses pooled buffers while the steps queued before it still run, so a buffer handed back before the
  programs reading it had finished would show here."""
  from resnext_jax import benchmark  # pylint: disable=import-outside-toplevel
  step_args = benchmark.parse_args(["--model", args.model, "--batch-size", str(args.batch_size), "--image-size",
                                    str(args.image_size), "--dtype", args.dtype, "--config", args.config])
  compiled, state, synthetic, compile_seconds = benchmark.compiled_step(step_args)

  def steps(state, feeds):  # -> (state, images/s): the step on each batch `feeds` yields, dispatched ahead
    count, start = 0, time.perf_counter()
    for batch in feeds:
      state, metrics = compiled(state, batch)
      count += args.batch_size
    jax.block_until_ready(metrics)
    return state, count / (time.perf_counter() - start)

  def decoded(passes, kept=None):
    for _ in range(passes):
      for batch in batches:
        images = augment(batch)
        if kept is not None and len(kept) < 4:
          kept.append(images)
        yield dict(synthetic, image=jax.device_put(images, synthetic["image"].sharding))

  # The first batches augmented one at a time, each finished before the next decode: no buffer can be reused
  # while a program still reads it. The loop below decodes each batch while the steps before it still run.
  alone = [jax.block_until_ready(augment(batch)) for batch in batches[:4]]
  state, _ = steps(state, [synthetic])  # warm-up
  state, step_per_s = steps(state, [synthetic] * args.steps)
  in_loop = []
  state, _ = steps(state, decoded(1, in_loop))
  _, loop_per_s = steps(state, decoded(args.loop_passes))
  reuse_diff = max(float(jnp.abs(a - b).max()) for a, b in zip(alone, in_loop))
  return {"model": args.model, "dtype": args.dtype, "step_compile_seconds": round(compile_seconds, 1),
          "step_images_per_s": round(step_per_s, 1), "loop_images_per_s": round(loop_per_s, 1),
          "loop_over_step": round(loop_per_s / step_per_s, 3),
          "loop_batches_max_abs_diff_vs_alone": reuse_diff}


if __name__ == "__main__":
  try:
    main()
  except errors.ResNeXtError as e:  # a configuration or data problem: one line that names it
    raise SystemExit(f"error: {e}") from e
