"""Training curves from a run's TensorBoard event files, drawn into one PNG.

  python -m resnext_jax.plots --workdir DIR [--output DIR/curves.png]

Panels: loss (train and eval), top-1 accuracy, learning rate. A resumed run repeats the steps between its
last checkpoint and the interruption; for each step the value written last wins, as TensorBoard shows it.
"""

import argparse
import os
import sys

PANELS = (
    ("loss", lambda tag: "loss" in tag),
    ("top-1 accuracy", lambda tag: "top1" in tag or "accuracy" in tag),
    ("learning rate", lambda tag: "learning_rate" in tag or tag.endswith("lr")),
)


def read_scalars(workdir):
  """{tag: [(step, value), ...] sorted by step} from every event file under `workdir`."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util

  series = {}
  for directory in sorted({root for root, _, files in os.walk(workdir)
                           if any(".tfevents." in f for f in files)}):
    prefix = os.path.relpath(directory, workdir)
    acc = ea.EventAccumulator(directory, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    events = {t: [(e.wall_time, e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                  for e in acc.Tensors(t)] for t in acc.Tags()["tensors"]}
    events.update({t: [(e.wall_time, e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]})
    for tag, values in events.items():
      latest = {step: value for _, step, value in sorted(values)}  # later writes win
      series[tag if prefix == "." else f"{prefix}/{tag}"] = sorted(latest.items())
  return series


def plot(series, output, title=""):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
  for ax, (name, matches) in zip(axes, PANELS):
    for tag in sorted(t for t in series if matches(t.rsplit("/", 1)[-1])):
      steps, values = zip(*series[tag])
      ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=tag)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(output, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a training run's workdir (holds the event files)")
  parser.add_argument("--output", default=None, help="PNG path (default: WORKDIR/curves.png)")
  args = parser.parse_args(argv)
  series = read_scalars(args.workdir) if os.path.isdir(args.workdir) else {}
  if not any(matches(t.rsplit("/", 1)[-1]) for t in series for _, matches in PANELS):
    print(f"error: no TensorBoard scalars (loss, accuracy, learning rate) under {args.workdir}", file=sys.stderr)
    return 2
  output = args.output or os.path.join(args.workdir, "curves.png")
  plot(series, output, title=os.path.basename(os.path.abspath(args.workdir)))
  print(f"wrote {output} ({len(series)} series)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
