"""The input pipeline against an earlier revision's own, images per CPU-second, processes taking turns.

input_pipeline_benchmark.py --legacy times the previous transforms inside today's pipeline. This script times a
whole earlier revision instead (its transforms, its tf.data structure, its host normalisation), as a user of that
revision ran it: a git worktree of --revision, run in its own processes, alternating with processes running this
checkout (with its uncommitted changes), on the same ImageNet-like JPEGs (datasets/synthetic_jpegs.py; the
revision reads a copy, so that the two TFDS builders never share a prepared folder). Each process times the train
stream (Inception crop + flip) and the eval transform (center crop 0.875) with one tf.data thread, in rounds, as
input_pipeline_benchmark.py does (pipeline_timing.timed_rounds). The ratio is the median over the pairs of
processes that ran one after the other. The last line is one JSON object.

  python benchmarks/input_pipeline_vs_revision.py --revision=aaadfbc   # the code issue 14 was filed against

Revisions whose pipeline is `resnext_jax.input_pipeline.train_dataset` (before cd24ab6) or
`resnext_jax.datasets.tf_pipeline.train_dataset` (since) are understood.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from pipeline_timing import add_timing_flags, cached_eval_stream, cpu_model, pipeline_config, timed_rounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAMS = ("train", "eval")


def child(args) -> None:
  """Times the package found at args.tree (first on sys.path) and prints its rounds as one JSON line."""
  sys.path.insert(0, args.tree)
  import resnext_jax  # pylint: disable=import-outside-toplevel
  if not os.path.abspath(resnext_jax.__file__).startswith(os.path.abspath(args.tree) + os.sep):
    raise RuntimeError(f"imported {resnext_jax.__file__}, not the package in {args.tree}")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from resnext_jax.datasets import sources  # pylint: disable=import-outside-toplevel
  try:  # since cd24ab6
    from resnext_jax.datasets import tf_pipeline as pipeline  # pylint: disable=import-outside-toplevel
    eval_transform = pipeline.eval_transform
  except ImportError:
    from resnext_jax import input_pipeline as pipeline  # pylint: disable=import-outside-toplevel
    eval_transform = getattr(pipeline, "_eval_transform", None)
    if eval_transform is None or not hasattr(pipeline, "train_dataset"):
      sys.exit(f"{args.tree} has neither datasets/tf_pipeline.py nor input_pipeline.train_dataset and "
               "_eval_transform: a pipeline layout this script does not know")

  tf.config.set_visible_devices([], "GPU")
  config = pipeline_config(args, args.data_dir)
  source = sources.get_source(config)
  train = pipeline.train_dataset(source, config, start_step=0, process_index=0, process_count=1)
  evals = cached_eval_stream(source, eval_transform(sources.transform_style(config), config), args.batch_size)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  iterators = {}
  for name, ds in zip(STREAMS, (train, evals)):
    ds = ds.with_options(options)
    for _ in ds.take(args.num_images // args.batch_size + 1):
      pass  # fill the cache
    iterators[name] = ds.as_numpy_iterator()
  rounds = timed_rounds(iterators, args.batch_size, args.seconds, args.repeats, args.settle)
  print(json.dumps({name: per_cpu for name, (_, per_cpu, _) in rounds.items()}))


def run_child(args, tree: str, data_dir: str) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--child", "--tree", tree, "--data_dir", data_dir,
             *(f"--{k}={getattr(args, k)}" for k in ("num_images", "image_size", "batch_size", "seconds",
                                                    "repeats", "settle"))]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])))
  done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=False)
  if done.returncode:
    sys.exit(f"timing the pipeline of {tree} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def git(*args) -> str:
  done = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=False)
  if done.returncode:
    sys.exit(f"git {' '.join(args)} failed in {REPO}: {done.stderr.strip()}")
  return done.stdout.strip()


def compare(args) -> dict:
  revision = git("rev-parse", "--short", "--verify", f"{args.revision}^{{commit}}")
  from resnext_jax.datasets import synthetic_jpegs  # pylint: disable=import-outside-toplevel
  data_dir = os.path.join(args.data_dir or synthetic_jpegs.DEFAULT_DATA_DIR, f"n{args.num_images}")
  stats = synthetic_jpegs.write_image_folder(data_dir, args.num_images)
  with tempfile.TemporaryDirectory() as tmp:
    tree, copy = os.path.join(tmp, "tree"), os.path.join(tmp, "jpegs")
    git("worktree", "add", "--detach", tree, revision)
    try:
      shutil.copytree(os.path.join(data_dir, "train"), os.path.join(copy, "train"))
      pairs = [(run_child(args, tree, copy), run_child(args, REPO, data_dir)) for _ in range(args.processes)]
    finally:
      subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], capture_output=True, check=False)
  result = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "revision": revision, "jpegs": stats,
            "load_average": round(os.getloadavg()[0], 1)}
  for name in STREAMS:
    old, new = [p[0][name] for p in pairs], [p[1][name] for p in pairs]
    result[f"{name}_images_per_cpu_s"] = round(float(np.median(new)), 1)
    result[f"{name}_revision_images_per_cpu_s"] = round(float(np.median(old)), 1)
    result[f"{name}_speedup_vs_revision"] = round(float(np.median(np.divide(new, old))), 2)
    result[f"{name}_runs"] = [[round(o, 1), round(n, 1)] for o, n in zip(old, new)]
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--revision", default="HEAD", help="the git revision to time against")
  parser.add_argument("--processes", type=int, default=4, help="processes per side, taking turns")
  add_timing_flags(parser)
  parser.add_argument("--data_dir", help="where the generated JPEG folder is kept (reused when it matches); "
                      "default: input_pipeline_benchmark.py's")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--tree", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child(args)
  sys.path.insert(0, REPO)
  result = compare(args)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
