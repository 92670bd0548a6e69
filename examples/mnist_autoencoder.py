"""The MNIST deep autoencoder of Martens & Grosse (2015), trained with K-FAC or Adam.

The network is the paper's 784-1000-500-250-30-250-500-1000-784: logistic
(sigmoid) hidden units, a linear 30-unit code layer and a sigmoid output. The
objective is the paper's too: binary cross-entropy *summed* over the 784
pixels, averaged over the cases. Keras's cross-entropy averages over the
pixels, so the model outputs logits, the loss is
`BinaryCrossentropy(from_logits=True)` and `compile(loss_weights=784.0)` turns
the average back into the sum; tf_kfac reads the loss weight, so its Fisher
(and the meaning of the damping λ) is that of the summed objective, as in the
paper. K-FAC runs with KFAC's defaults (the fixed mode) and the paper's L2
coefficient η = 1e-5; `--adaptive` runs the paper's own configuration: step
size and momentum from the quadratic model, Levenberg-Marquardt damping from
λ₀ = 150.

Each epoch it reports the squared reconstruction error the paper plots, the sum
over the 784 pixels of (x − x̂)², averaged over the cases, measured on the whole
training set at the end of the epoch, next to the training objective and
K-FAC's damping, α, μ and ρ. It prints that table, saves a learning-curve plot
and exports the reconstructing model (input (N, 784) in [0, 1] → x̂) as a
SavedModel.

    python examples/mnist_autoencoder.py                           # tfds MNIST, 60,000 images
    python examples/mnist_autoencoder.py --data-dir ~/mnist --split test --seconds 90
    python examples/mnist_autoencoder.py --optimizer adam --seconds 90

`main(argv)` returns the per-epoch history as a dict of lists (`.model` is the
exported model), so tests and benchmarks can run it in-process.

The weights start from the paper's sparse initialisation (`--init glorot` for
Keras's default, with which K-FAC's adaptive mode did not leave the plateau of
the mean image, error ≈ 52.9, within 90 s). Differences from the paper: a fixed
batch size instead of a growing one, and no L2 term for Adam (η = 1e-5 barely
changes the objective).

What to expect on the 10,000 test images (`--split test`), batch size 1000, two
shared CPU cores, 200 s budget each (error on the training set at ~90 s and at
200 s): Adam 10.1 and 7.0 (1,640 steps); K-FAC adaptive (λ₀ = 150) 14.7 and
4.9 (285 steps; it spends its first ~100 steps bringing λ down); K-FAC fixed
mode at KFAC's defaults (the default here) 7.2 and 2.3 (870 steps).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_kfac  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:  # also when imported from tests or benchmarks
    sys.path.insert(0, str(EXAMPLES))

import example_utils  # noqa: E402
from example_utils import History, export_and_check  # noqa: E402
from mnist_data import load_mnist, to_float  # noqa: E402

PIXELS = 784
ENCODER = (1000, 500, 250)
CODE = 30
PAPER_DAMPING = 150.0
PAPER_L2 = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_utils.training_parser(__doc__.split("\n\n")[0], "mnist_autoencoder",
                                           batch_size=1000, epochs=10)
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=False,
                        help="K-FAC's adaptive mode, the paper's configuration (quadratic-"
                             "model step size and momentum, Levenberg-Marquardt damping from "
                             "λ₀ = 150); default: the fixed mode (learning rate, momentum, "
                             "KL-clip), which reached a lower error in the same time here")
    parser.add_argument("--adapt-gamma", action=argparse.BooleanOptionalAction, default=False,
                        help="also adapt the factored-Tikhonov strength γ (paper §6.6; "
                             "adaptive mode only; default: off)")
    parser.add_argument("--damping", type=float, default=None,
                        help=f"K-FAC's (initial) damping λ (adaptive: {PAPER_DAMPING:g}, the "
                             "paper's λ₀; fixed: KFAC's default)")
    parser.add_argument("--l2-reg", type=float, default=PAPER_L2,
                        help=f"K-FAC's L2 coefficient η ({PAPER_L2:g}, the paper's)")
    parser.add_argument("--init", choices=("sparse", "glorot"), default="sparse",
                        help="weight initialisation: the paper's sparse one (15 N(0, 1) "
                             "weights into each unit; default) or Keras's Glorot uniform")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and order (0)")
    args = example_utils.finish_args(parser, parser.parse_args(argv))
    if args.adapt_gamma and not args.adaptive:
        parser.error("--adapt-gamma needs the adaptive mode")
    return args


class SparseInitializer(keras.initializers.Initializer):
    """Martens (2010)'s sparse initialisation, as the paper uses it.

    Each unit (kernel column) gets `nonzero` incoming weights drawn from
    N(0, 1); all its other incoming weights are 0. Biases stay 0.
    """

    def __init__(self, nonzero: int = 15, seed: int | None = None):
        self.nonzero = nonzero
        self.seed = seed

    def __call__(self, shape, dtype=None):
        fan_in, fan_out = shape
        rng = np.random.default_rng(self.seed)
        k = min(self.nonzero, fan_in)
        rows = np.argsort(rng.random((fan_in, fan_out)), axis=0)[:k]
        kernel = np.zeros((fan_in, fan_out), np.float32)
        kernel[rows, np.arange(fan_out)] = rng.standard_normal((k, fan_out))
        return keras.ops.convert_to_tensor(kernel, dtype=dtype or "float32")

    def get_config(self):
        return {"nonzero": self.nonzero, "seed": self.seed}


def build_model(init: str = "sparse", seed: int = 0) -> keras.Model:
    """784-1000-500-250-30-250-500-1000-784; outputs the logits of the 784 pixels.

    `init`: `"sparse"` (the paper's, see `SparseInitializer`) or `"glorot"`
    (Keras's default).
    """
    sizes = [*ENCODER, CODE, *reversed(ENCODER), PIXELS]
    activations = ["sigmoid"] * len(ENCODER) + [None] + ["sigmoid"] * len(ENCODER) + [None]
    names = [None] * len(ENCODER) + ["code"] + [None] * len(ENCODER) + ["logits"]
    layers = [keras.Input((PIXELS,))]
    for i, (units, activation, name) in enumerate(zip(sizes, activations, names, strict=True)):
        kernel = SparseInitializer(seed=1000 * seed + i) if init == "sparse" else "glorot_uniform"
        layers.append(keras.layers.Dense(units, activation=activation, name=name,
                                         kernel_initializer=kernel))
    return keras.Sequential(layers, name="mnist_autoencoder")


def reconstruction_error(x, logits):
    """Per case: Σ over the pixels of (x − x̂)², x̂ = sigmoid(logits)."""
    x_hat = keras.ops.sigmoid(logits)
    return keras.ops.sum(keras.ops.square(keras.ops.cast(x, x_hat.dtype) - x_hat), axis=-1)


def make_optimizer(args) -> keras.optimizers.Optimizer:
    if args.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=args.learning_rate or 1e-3)
    options = {"l2_reg": args.l2_reg, "seed": args.seed}
    if args.adaptive:
        options.update(adaptive=True, adapt_gamma=args.adapt_gamma,
                       damping=PAPER_DAMPING if args.damping is None else args.damping)
    else:
        options.update(example_utils.fixed_mode_options(args))
        if args.damping is not None:
            options["damping"] = args.damping
    return tf_kfac.KFAC(**options)


class Monitor(example_utils.Monitor):
    """Adds the objective and the error on the whole training set to each epoch's record."""

    def __init__(self, x_eval, batch_size, budget=None, print_row=None):
        super().__init__(budget=budget, print_row=print_row)
        self.x_eval = x_eval
        self.batch_size = batch_size

    def measure(self) -> dict:
        measured = self.model.evaluate(self.x_eval, self.x_eval, batch_size=self.batch_size,
                                       verbose=0, return_dict=True)
        return {"train_loss": float(measured["loss"]),
                "train_error": float(measured["reconstruction_error"])}


def table_printer(columns):
    header = f"{'epoch':>5} {'steps':>6} {'seconds':>8} {'objective':>10} {'error':>9}"
    header += "".join(f" {name:>10}" for name in columns)

    def print_row(record):
        if record["epoch"] == 1:
            print("objective (summed cross-entropy) and error (squared reconstruction error) "
                  "on the whole\ntraining set after each epoch; seconds: training time so far")
            print(header)
        row = (f"{record['epoch']:>5} {record['steps']:>6} {record['seconds']:>8.1f} "
               f"{record['train_loss']:>10.3f} {record['train_error']:>9.3f}")
        row += "".join(f" {record.get(name, float('nan')):>10.4g}" for name in columns)
        print(row, flush=True)

    return print_row


def plot(history: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_time, ax_epoch) = plt.subplots(1, 2, figsize=(10, 4))
    ax_time.plot(history["seconds"], history["train_error"], marker="o")
    ax_time.set(xlabel="training time (s)", ylabel="squared reconstruction error",
                yscale="log", title="Error on the training set")
    ax_epoch.plot(history["epoch"], history["train_error"], marker="o", label="error")
    ax_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_epoch.set(xlabel="epoch", ylabel="squared reconstruction error", yscale="log",
                 title="Per epoch")
    for ax in (ax_time, ax_epoch):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(args) -> str:
    if args.optimizer == "adam":
        return f"Adam (learning rate {args.learning_rate or 1e-3:g})"
    if args.adaptive:
        damping = PAPER_DAMPING if args.damping is None else args.damping
        gamma = ", adaptive γ" if args.adapt_gamma else ""
        return f"K-FAC adaptive (λ₀ = {damping:g}, η = {args.l2_reg:g}{gamma})"
    return "K-FAC fixed mode" + "".join(
        f", {name} {value:g}" for name, value in
        (("damping", args.damping), ("learning rate", args.learning_rate)) if value is not None
    )


def main(argv=None) -> History:
    """Trains and reports; returns the per-epoch history (see `History`)."""
    args = parse_args(argv)
    images, _ = load_mnist(args.data_dir, args.split)
    x = to_float(images)
    source = args.data_dir if args.data_dir is not None else "tensorflow_datasets"
    print(f"MNIST {args.split} split from {source}: {len(x):,} images; {args.init} "
          f"initialisation; batch size {args.batch_size}; {describe(args)}"
          + (f"; {args.seconds:g} s budget" if args.seconds is not None else ""))

    keras.utils.set_random_seed(args.seed)
    model = build_model(args.init, args.seed)
    optimizer = make_optimizer(args)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        loss_weights=float(PIXELS),  # Keras averages over the pixels; the paper sums
        metrics=[keras.metrics.MeanMetricWrapper(reconstruction_error,
                                                 name="reconstruction_error")],
    )
    columns = []
    if args.optimizer == "kfac":
        columns = ["damping", "alpha", "mu", "rho"] if args.adaptive else ["damping", "kl_scale"]
    monitor = Monitor(x, args.batch_size, args.seconds, table_printer(columns))
    model.fit(x, x, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              callbacks=[monitor], verbose=0)

    history = History()
    for record in monitor.records:
        for key, value in record.items():
            history.setdefault(key, []).append(value)

    if args.optimizer == "kfac":
        print()
        optimizer.summary()
    print()
    plot(history, f"MNIST deep autoencoder: {describe(args)}", args.plot)
    print(f"Plot saved to {args.plot}")

    reconstruct = keras.Sequential([model, keras.layers.Activation("sigmoid")],
                                   name="mnist_autoencoder_reconstruct")
    export_and_check(reconstruct, args.export, x[:256])
    history.model = reconstruct
    return history


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"Total time: {time.perf_counter() - start:.1f} s")
