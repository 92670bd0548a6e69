"""Which share of a model's parameters gets curvature, on the layer kinds users write.

    python benchmarks/layer_coverage.py            # coverage, and 8 epochs K-FAC vs Adam
    python benchmarks/layer_coverage.py --no-train # coverage only (seconds)

Four small Keras models, Keras's default initialisers: a transformer classifier
(Embedding, 2 × (MultiHeadAttention, LayerNormalization, Dense FFN)), a Conv1D
classifier, a MobileNet-like net (Conv2D, BatchNormalization, DepthwiseConv2D,
SeparableConv2D) and an LSTM classifier. For each: the parameters that
`KFAC().summary()` gives a curvature block, and (unless --no-train) the training
loss after 8 epochs of `tf_kfac.KFAC()` and of `keras.optimizers.Adam(1e-3)` on a
synthetic task, from the same initial weights. Writes
`benchmarks/results/layer_coverage.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tf_kfac  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
layers = keras.layers


def transformer(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, (2048, 16))
    y = (x[:, :8].sum(1) > x[:, 8:].sum(1)).astype("int32") + 2 * (x[:, 0] > 50)
    tokens = keras.Input((16,), dtype="int32")
    h = layers.Embedding(100, 64)(tokens)
    for _ in range(2):
        h = layers.LayerNormalization()(h + layers.MultiHeadAttention(4, 16)(h, h))
        f = layers.Dense(64)(layers.Dense(128, activation="relu")(h))
        h = layers.LayerNormalization()(h + f)
    out = layers.Dense(4, activation="softmax")(layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, out), x, y


def conv1d(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2048, 64, 4)).astype("float32")
    y = (np.abs(x[:, :, 0]).mean(1) > np.abs(x[:, :, 1]).mean(1)).astype("int32")
    model = keras.Sequential([keras.Input((64, 4)), layers.Conv1D(32, 5, activation="relu"),
                              layers.Conv1D(32, 5, strides=2, activation="relu"),
                              layers.GlobalAveragePooling1D(), layers.Dense(32, "relu"),
                              layers.Dense(2, activation="softmax")])
    return model, x, y


def mobilenet_like(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1024, 16, 16, 3)).astype("float32")
    y = (x[:, :8, :, 0].mean((1, 2)) > x[:, 8:, :, 0].mean((1, 2))).astype("int32")
    inputs = keras.Input((16, 16, 3))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(32, 3, padding="same")(inputs)))
    h = layers.ReLU()(layers.BatchNormalization()(layers.DepthwiseConv2D(3, padding="same")(h)))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(64, 1)(h)))
    h = layers.ReLU()(layers.BatchNormalization()(
        layers.SeparableConv2D(64, 3, strides=2, padding="same")(h)))
    out = layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, out), x, y


def lstm(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2048, 20, 8)).astype("float32")
    y = (x[:, :, 0].cumsum(1)[:, -1] > 0).astype("int32")
    model = keras.Sequential([keras.Input((20, 8)), layers.LSTM(64),
                              layers.Dense(2, activation="softmax")])
    return model, x, y


MODELS = {"transformer": transformer, "conv1d": conv1d, "mobilenet_like": mobilenet_like,
          "lstm": lstm}


def coverage(model, x, y) -> tuple[int, int, str]:
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    opt.attach(model)
    text = opt.summary(print_fn=lambda _: None)
    curved, total = re.search(r"cover ([\d,]+) of ([\d,]+)", text).groups()
    return int(curved.replace(",", "")), int(total.replace(",", "")), text


def train(name, optimizer, epochs, seed):
    keras.utils.set_random_seed(seed)
    model, x, y = MODELS[name](seed)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0)
    return {"loss": history.history["loss"][-1], "accuracy": history.history["accuracy"][-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    record = {"versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                           "tf_kfac": tf_kfac.__version__},
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "models": {}}
    for name, build in MODELS.items():
        keras.utils.set_random_seed(args.seed)
        curved, total, text = coverage(*build(args.seed))
        entry = {"curved": curved, "total": total, "share": curved / total, "summary": text}
        if not args.no_train:
            entry["kfac"] = train(name, tf_kfac.KFAC(seed=args.seed), args.epochs, args.seed)
            entry["adam"] = train(name, keras.optimizers.Adam(1e-3), args.epochs, args.seed)
        record["models"][name] = entry
        print(f"{name}: {curved:,} of {total:,} parameters ({curved / total:.1%})",
              {k: v for k, v in entry.items() if k in ("kfac", "adam")}, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layer_coverage.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Curvature coverage", "",
             f"`python benchmarks/layer_coverage.py` on {record['machine']}; TensorFlow "
             f"{tf.__version__}, Keras {keras.__version__}, tf_kfac {tf_kfac.__version__}.",
             "", "| model | parameters with curvature | K-FAC loss / acc | Adam(1e-3) loss / acc |",
             "|---|---|---|---|"]
    for name, e in record["models"].items():
        runs = [f"{e[k]['loss']:.3f} / {e[k]['accuracy']:.0%}" if k in e else "–"
                for k in ("kfac", "adam")]
        lines.append(f"| {name} | {e['curved']:,} of {e['total']:,} ({e['share']:.1%}) | "
                     f"{runs[0]} | {runs[1]} |")
    lines += ["", f"Training: {args.epochs} epochs, batch 64, same initial weights and data "
              "order; K-FAC at its defaults (`tf_kfac.KFAC()`)."]
    (RESULTS / "layer_coverage.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
