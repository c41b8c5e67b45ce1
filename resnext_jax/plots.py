"""Training curves from a run's TensorBoard event files, drawn into one PNG.

  python -m resnext_jax.plots --workdir DIR [--output DIR/curves.png]

Panels: loss (train and eval), top-1 accuracy, learning rate. A resumed run repeats the steps between its
last checkpoint and the interruption; for each step the value written last wins, as TensorBoard shows it.

`plot_confusion` draws an eval's confusion matrix and per-class accuracy (evaluate.write_confusion calls it).
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
  _save(fig, output, title, dpi=110)


def plot_confusion(matrix, class_names, output, title=""):
  """A confusion matrix (rows: true class, columns: predicted; each row divided by its count, so the diagonal is
  the per-class accuracy) beside the per-class accuracy, into one PNG. Up to 30 classes the cells carry their
  counts and the axes the class names; with more, the matrix is an image (1000 x 1000 for ImageNet) and the
  accuracies are drawn sorted, worst first, with the five worst classes named."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  matrix = np.asarray(matrix, np.int64)
  n = len(matrix)
  names = [str(s) for s in class_names] if class_names is not None and len(class_names) == n else [
      str(i) for i in range(n)]
  counts = matrix.sum(axis=1)
  rates = matrix / np.maximum(counts, 1)[:, None]
  accuracy = np.where(counts > 0, np.diag(matrix) / np.maximum(counts, 1), np.nan)
  small = n <= 30
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 6) if small else (14, 6.5),
                               gridspec_kw={"width_ratios": (1.1, 1)})
  image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title("confusion matrix (row-normalised)")
  if small:
    ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for i in range(n):
      for j in range(n):
        if matrix[i, j]:
          ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                  color="white" if rates[i, j] > 0.5 else "black")
    bx.barh(range(n), np.nan_to_num(accuracy), color="tab:blue")
    bx.set_yticks(range(n), names, fontsize=8)
    bx.invert_yaxis()
    bx.set_xlim(0, 1)
    bx.set_xlabel("accuracy")
  else:
    order = np.argsort(np.nan_to_num(accuracy, nan=2.0), kind="stable")
    bx.plot(np.arange(n), accuracy[order], color="tab:blue")
    bx.set_ylim(0, 1.02)
    bx.set_xlabel("classes, sorted by accuracy")
    bx.set_ylabel("accuracy")
    worst = ", ".join(f"{names[i]} {accuracy[i]:.2f}" for i in order[:5] if not np.isnan(accuracy[i]))
    bx.text(0.02, 0.02, f"worst: {worst}", transform=bx.transAxes, fontsize=8, va="bottom")
  bx.set_title("per-class accuracy")
  bx.grid(alpha=0.3)
  _save(fig, output, title, dpi=100)


def _save(fig, output, title, *, dpi):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(output, dpi=dpi)
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
