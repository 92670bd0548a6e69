"""A small MNIST convnet classifier trained with K-FAC or Adam, with a held-out split.

Conv2D(16, 5, relu) - MaxPool - Conv2D(32, 5, relu) - MaxPool - Flatten -
Dense(128, relu) - Dense(10), trained on logits with
`SparseCategoricalCrossentropy(from_logits=True)`. A random fraction of the
chosen MNIST split is held out (`--heldout-fraction`, 0.2 by default); each
epoch reports the training loss and accuracy (means over the epoch's batches,
as Keras reports them), the held-out loss and accuracy at the end of the
epoch, the training seconds and K-FAC's scalars. It prints that table, saves a
learning-curve plot and exports the classifier (input (N, 28, 28, 1) in
[0, 1] → class probabilities) as a SavedModel.

K-FAC runs with its default hyperparameters (fixed learning rate, momentum and
KL-clip) unless `--adaptive` asks for the paper's adaptive mode (also at
KFAC's defaults). `main(argv)` returns the per-epoch history as a dict of
lists (`.model` is the exported model), so tests and benchmarks can run it
in-process.

    python examples/mnist_convnet.py                               # tfds MNIST, 60,000 images
    python examples/mnist_convnet.py --data-dir ~/mnist --split test --epochs 3
    python examples/mnist_convnet.py --optimizer adam --epochs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import tf_kfac  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:  # also when imported from tests or benchmarks
    sys.path.insert(0, str(EXAMPLES))

import example_utils  # noqa: E402
from example_utils import History, Monitor, export_and_check  # noqa: E402
from mnist_data import load_mnist, to_float, train_heldout_split  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_utils.training_parser(__doc__.split("\n\n")[0], "mnist_convnet",
                                           batch_size=128, epochs=5)
    parser.add_argument("--heldout-fraction", type=float, default=0.2,
                        help="fraction of the split held out for evaluation (0.2)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=False,
                        help="K-FAC's adaptive mode (quadratic-model step size and momentum, "
                             "Levenberg-Marquardt damping); default: the fixed mode")
    parser.add_argument("--damping", type=float, default=None,
                        help="K-FAC's damping λ, the initial one in the adaptive mode "
                             "(KFAC's defaults)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of weights, held-out split and order (0)")
    args = example_utils.finish_args(parser, parser.parse_args(argv))
    if not 0.0 < args.heldout_fraction < 1.0:
        parser.error("--heldout-fraction must be in (0, 1)")
    return args


def build_model() -> keras.Model:
    """The convnet; outputs the logits of the 10 classes."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 5, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 5, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="mnist_convnet",
    )


def make_optimizer(args) -> keras.optimizers.Optimizer:
    if args.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=args.learning_rate or 1e-3)
    options = {"seed": args.seed, "adaptive": args.adaptive}
    if args.damping is not None:
        options["damping"] = args.damping
    if not args.adaptive:
        options.update(example_utils.fixed_mode_options(args))
    return tf_kfac.KFAC(**options)


def table_printer(columns):
    header = (f"{'epoch':>5} {'steps':>6} {'seconds':>8} {'loss':>8} {'accuracy':>9} "
              f"{'val loss':>9} {'val acc':>8}")
    header += "".join(f" {name:>10}" for name in columns)

    def print_row(record):
        if record["epoch"] == 1:
            print(header)
        row = (f"{record['epoch']:>5} {record['steps']:>6} {record['seconds']:>8.1f} "
               f"{record['loss']:>8.4f} {record['accuracy']:>9.2%} "
               f"{record['val_loss']:>9.4f} {record['val_accuracy']:>8.2%}")
        row += "".join(f" {record.get(name, float('nan')):>10.4g}" for name in columns)
        print(row, flush=True)

    return print_row


def plot(history: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["loss"], marker="o", label="train")
    ax_loss.plot(epochs, history["val_loss"], marker="o", linestyle="--", label="held-out")
    ax_acc.plot(epochs, history["accuracy"], marker="o", label="train")
    ax_acc.plot(epochs, history["val_accuracy"], marker="o", linestyle="--", label="held-out")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(args) -> str:
    if args.optimizer == "adam":
        return f"Adam (learning rate {args.learning_rate or 1e-3:g})"
    if args.adaptive:
        return "K-FAC adaptive" + (f" (λ₀ = {args.damping:g})" if args.damping else "")
    return "K-FAC fixed mode" + "".join(
        f", {name} {value:g}" for name, value in
        (("damping", args.damping), ("learning rate", args.learning_rate)) if value is not None
    )


def main(argv=None) -> History:
    """Trains and reports; returns the per-epoch history (see `History`)."""
    args = parse_args(argv)
    images, labels = load_mnist(args.data_dir, args.split)
    (x_train, y_train), (x_val, y_val) = train_heldout_split(
        to_float(images, flatten=False), labels, args.heldout_fraction, args.seed)
    source = args.data_dir if args.data_dir is not None else "tensorflow_datasets"
    print(f"MNIST {args.split} split from {source}: {len(x_train):,} training and "
          f"{len(x_val):,} held-out images; batch size {args.batch_size}; {describe(args)}"
          + (f"; {args.seconds:g} s budget" if args.seconds is not None else ""))

    keras.utils.set_random_seed(args.seed)
    model = build_model()
    optimizer = make_optimizer(args)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    columns = []
    if args.optimizer == "kfac":
        columns = ["damping", "alpha", "mu", "rho"] if args.adaptive else ["damping", "kl_scale"]
    monitor = Monitor(args.seconds, table_printer(columns))
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              validation_data=(x_val, y_val), callbacks=[monitor], verbose=0)

    history = History()
    for record in monitor.records:
        for key, value in record.items():
            history.setdefault(key, []).append(value)

    if args.optimizer == "kfac":
        print()
        optimizer.summary()
    print()
    plot(history, f"MNIST convnet: {describe(args)}", args.plot)
    print(f"Plot saved to {args.plot}")

    classifier = keras.Sequential([model, keras.layers.Softmax()], name="mnist_convnet_classify")
    export_and_check(classifier, args.export, x_val[:256])
    history.model = classifier
    return history


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"Total time: {time.perf_counter() - start:.1f} s")
