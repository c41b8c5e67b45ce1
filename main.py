"""Trains, evaluates or predicts with ResNeXt; the logic lives in resnext_jax (train, evaluate, predict).

  python main.py --config=configs/digits_resnext.py --workdir=/tmp/digits
  python main.py --config=configs/imagenet_resnext50.py --workdir=DIR --config.batch_size=512
  python main.py --config=configs/digits_resnext.py --workdir=/tmp/digits --mode=eval
  python main.py --config=configs/digits_resnext.py --workdir=/tmp/digits --mode=predict --predict_files=a.png,b.png

Several hosts: give --coordinator_address, --num_processes and --process_id (on a TPU pod or under SLURM, none
of them: JAX detects the cluster).
"""

import gc
import logging as std_logging  # record levels (absl's WARNING constant is its own scale)
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/digits_resnext.py", "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard summaries.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "train (evaluates as it goes), eval or predict.")
flags.DEFINE_list("predict_files", [], "Image files for --mode=predict.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_bool("retain_host_memory", True, "Keep freed host memory for reuse (glibc): steps reuse pages "
                  "instead of faulting them in anew; see resnext_jax/cpu/host_memory.py.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if FLAGS.retain_host_memory:
    from resnext_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.retain_freed_memory()    # before JAX and TensorFlow start their threads
  from resnext_jax import errors, evaluate, predict, runtime, train  # pylint: disable=g-import-not-at-top
  try:
    runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
      evaluate.evaluate(FLAGS.config, FLAGS.workdir)
    else:
      if not FLAGS.predict_files:
        raise errors.ConfigError("--mode=predict needs --predict_files=a.jpg,b.png")
      failed = predict.predict(FLAGS.config, FLAGS.workdir, FLAGS.predict_files)
      if failed:
        print(f"error: {failed} of {len(FLAGS.predict_files)} files could not be predicted", file=sys.stderr)
        sys.exit(1)
  except errors.ResNeXtError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  finally:
    _skip_collection_at_exit()


def _skip_collection_at_exit():
  """The job is done (its checkpoints, summaries and outputs are closed and flushed): keep Python's collector off
  the objects TensorFlow, JAX and the traced steps leave, which interpreter shutdown would otherwise traverse in
  its collections. Objects are still freed by reference counting; only cycles are left to the exiting process.

  Why: shutdown took ~2 s after the digits demo's result line, mostly in the collector (perf: gc_collect_main;
  2-core AVX2 EPYC), against 0.3 s with this.
  """
  gc.freeze()


def _quiet_orbax(record):
  """Orbax logs every save in a dozen INFO lines; keep its warnings, drop the chatter."""
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_orbax)
  app.run(main)
