"""Time to target: K-FAC against Keras's Adam, SGD (Nesterov) and Muon, same wall-clock budget.

    python benchmarks/time_to_target.py --data-dir path/to/mnist             # 300 s a run
    python benchmarks/time_to_target.py --data-dir path/to/mnist --budget 60
    python benchmarks/time_to_target.py --data-dir path/to/mnist --quick     # < 5 minutes

Workloads (the examples' models, on the 10,000-image MNIST test split when
`--data-dir` points at its IDX files, otherwise on tfds's `mnist` test split):

* `autoencoder`: the paper's 784-1000-500-250-30 deep autoencoder at batch
  1000; error = per-case squared reconstruction error on all images (lower is
  better), as the paper plots it.
* `convnet`: examples/mnist_convnet.py's classifier at batch 128 on an 80/20
  split; error = held-out classification error in % (lower is better).

Every optimizer runs one after the other in its own process (so peak memory is
its own), with the same initial weights and data order, until it has trained
for the budget; evaluations and the first step (tracing and compiling the
train function) are not charged to its clock. Baselines get a
small learning-rate sweep (a factor ~3 around values known to work for each
workload); K-FAC runs in its recommended configuration without a sweep.
Writes `benchmarks/results/time_to_target[_quick].{json,md,png}`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

# Learning-rate sweeps (the middle value is the one --quick runs).
SWEEPS = {
    "autoencoder": {
        "adam": [3e-4, 1e-3, 3e-3],
        "sgd_nesterov": [1e-4, 3e-4, 1e-3, 3e-3],  # the loss sums 784 pixels
        "muon": [1e-3, 3e-3, 1e-2, 3e-2],
    },
    "convnet": {
        "adam": [3e-4, 1e-3, 3e-3],
        "sgd_nesterov": [1e-2, 3e-2, 1e-1],
        "muon": [1e-3, 3e-3, 1e-2],
    },
}
# K-FAC's recommended configuration per workload (see README, "Which mode").
KFAC_CONFIGS = {
    # The paper's η; `--kfac kl_clip=1e-2` is the faster variant (docs/benchmarks.md).
    "autoencoder": {"l2_reg": 1e-5},
    "convnet": {},
}
BATCH = {"autoencoder": 1000, "convnet": 128}
# A few error levels to report the time to (besides the best baseline's final error).
THRESHOLDS = {"autoencoder": [30.0, 15.0, 10.0, 5.0], "convnet": [5.0, 3.0, 2.0, 1.5]}


def _optimizer(name: str, lr: float | None, workload: str, seed: int, kfac: dict | None = None):
    import keras

    import tf_kfac

    if name == "kfac":
        return tf_kfac.KFAC(seed=seed, **{**KFAC_CONFIGS[workload], **(kfac or {})})
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "sgd_nesterov":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True)
    if name == "muon":
        return keras.optimizers.Muon(learning_rate=lr)
    raise ValueError(name)


def _workload(workload: str, data_dir: str | None, seed: int):
    """(model, compile kwargs, x, y, error function of the model) for a workload."""
    sys.path.insert(0, str(REPO / "examples"))
    import keras
    import numpy as np
    from mnist_data import load_mnist, to_float, train_heldout_split

    images, labels = load_mnist(data_dir, "test")
    if workload == "autoencoder":
        import mnist_autoencoder as ae

        x = to_float(images, flatten=True)
        model = ae.build_model(seed=seed)
        compile_kwargs = {"loss": keras.losses.BinaryCrossentropy(from_logits=True),
                          "loss_weights": float(ae.PIXELS)}

        def error(model):
            logits = model.predict(x, batch_size=2000, verbose=0)
            return float(np.mean(keras.ops.convert_to_numpy(ae.reconstruction_error(x, logits))))

        return model, compile_kwargs, x, x, error
    import mnist_convnet as cn

    x_all = to_float(images, flatten=False)
    (x, y), (x_val, y_val) = train_heldout_split(x_all, labels, 0.2, seed)
    model = cn.build_model()
    compile_kwargs = {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}

    def error(model):
        logits = model.predict(x_val, batch_size=2000, verbose=0)
        return float(100.0 * np.mean(np.argmax(logits, axis=-1) != y_val))

    return model, compile_kwargs, x, y, error


def run_one(spec: dict) -> dict:
    """Trains one optimizer for the budget (in a fresh process); returns its curve."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(spec["seed"])
    model, compile_kwargs, x, y, error = _workload(spec["workload"], spec["data_dir"],
                                                   spec["seed"])
    optimizer = _optimizer(spec["optimizer"], spec["lr"], spec["workload"], spec["seed"],
                           spec.get("kfac"))
    model.compile(optimizer=optimizer, **compile_kwargs)
    budget, evals = spec["budget"], spec["evaluations"]

    from clock import TrainingClock

    clock = TrainingClock(lambda: error(model), budget, evals)
    model.fit(x, y, batch_size=BATCH[spec["workload"]], epochs=10**6, shuffle=True,
              verbose=0, callbacks=[clock])
    warm = clock.step_times[5:] or clock.step_times
    return {
        **spec,
        "curve": clock.curve,
        "steps": clock.steps,
        "median_step_ms": 1e3 * statistics.median(warm),
        "first_step_s": clock.first_step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def time_to(curve, target: float) -> float | None:
    """First training time at which the error is at or below `target`."""
    for seconds, _, value in curve:
        if value <= target:
            return seconds
    return None


def summarise(workload: str, runs: list[dict], budget: float,
              kfac_config: dict | None = None) -> tuple[str, dict]:
    def final(run):
        return run["curve"][-1][2]

    baselines = [r for r in runs if r["optimizer"] != "kfac" and final(r) == final(r)]
    best_per = {}
    for r in baselines:
        if r["optimizer"] not in best_per or final(r) < final(best_per[r["optimizer"]]):
            best_per[r["optimizer"]] = r
    kfac = next(r for r in runs if r["optimizer"] == "kfac")
    best = min(best_per.values(), key=final) if best_per else None
    unit = "squared error per case" if workload == "autoencoder" else "held-out error %"
    lines = [f"### {workload} ({unit}, lower is better; budget {budget:g} s of training)", "",
             "| optimizer | lr | steps | ms/step | peak RSS MB | final error |"
             + (f" time to {final(best):.3g} (best baseline's final) |" if best else ""),
             "|---|---|---|---|---|---|" + ("---|" if best else "")]
    for r in sorted(runs, key=final):
        reach = time_to(r["curve"], final(best)) if best else None
        config = ", ".join(f"{k}={v:g}" for k, v in (kfac_config or {}).items()) or "defaults"
        cells = [r["optimizer"], config if r["lr"] is None else f"{r['lr']:g}",
                 str(r["steps"]), f"{r['median_step_ms']:.1f}", f"{r['peak_rss_mb']:.0f}",
                 f"{final(r):.4g}"]
        if best:
            cells.append("not reached" if reach is None else f"{reach:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Time to each error level (training seconds; best learning rate of each "
              "optimizer):", "",
              "| optimizer | " + " | ".join(f"≤ {t:g}" for t in THRESHOLDS[workload]) + " |",
              "|---|" + "---|" * len(THRESHOLDS[workload])]
    for r in [kfac, *sorted(best_per.values(), key=final)]:
        times = [time_to(r["curve"], t) for t in THRESHOLDS[workload]]
        lines.append(f"| {r['optimizer']} | " + " | ".join(
            "—" if t is None else f"{t:.1f} s" for t in times) + " |")
    verdict = {}
    if best:
        reach = time_to(kfac["curve"], final(best))
        verdict = {
            "best_baseline": f"{best['optimizer']} lr={best['lr']:g}",
            "best_baseline_final": final(best),
            "kfac_final": final(kfac),
            "kfac_time_to_best_baseline_final": reach,
            "fraction_of_budget": None if reach is None else reach / budget,
        }
        lines += ["", f"K-FAC reaches the best baseline's final error ({final(best):.4g}, "
                  f"{verdict['best_baseline']}) "
                  + ("never within the budget." if reach is None else
                     f"after {reach:.1f} s, {reach / budget:.0%} of the budget; "
                     f"it ends at {final(kfac):.4g}.")]
    return "\n".join(lines), verdict


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False)
    for row, (workload, runs) in enumerate(results.items()):
        for col, (index, label) in enumerate(((0, "training seconds"), (1, "steps"))):
            ax = axes[row][col]
            colors = plt.get_cmap("tab20").colors
            for i, r in enumerate(runs):
                xs = [p[index] for p in r["curve"][1:]]
                ys = [p[2] for p in r["curve"][1:]]
                name = r["optimizer"] + ("" if r["lr"] is None else f" {r['lr']:g}")
                kfac = r["optimizer"] == "kfac"
                ax.plot(xs, ys, label=name, color="black" if kfac else colors[i % len(colors)],
                        linewidth=2.5 if kfac else 1)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("error")
            ax.set_title(f"{workload}: error vs {label}")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None,
                        help="folder with the MNIST IDX files (default: tfds 'mnist')")
    parser.add_argument("--workloads", nargs="+", default=["autoencoder", "convnet"],
                        choices=["autoencoder", "convnet"])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds a run")
    parser.add_argument("--evaluations", type=int, default=30, help="error evaluations a run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="20 s a run and one learning rate per baseline (smoke run)")
    parser.add_argument("--optimizers", nargs="+", default=None,
                        choices=["kfac", "adam", "sgd_nesterov", "muon"],
                        help="run only these (default: all)")
    parser.add_argument("--lrs", nargs="+", default=None, metavar="OPTIMIZER=LR",
                        help="replace an optimizer's sweep by these learning rates "
                             "(e.g. adam=1e-3), to rerun the best of a sweep at a longer budget")
    parser.add_argument("--kfac", nargs="+", default=None, metavar="ARG=VALUE",
                        help="K-FAC hyperparameters to use instead of its recommended "
                             "configuration (e.g. kl_clip=1e-2), to try a variant")
    parser.add_argument("--name", default="time_to_target",
                        help="stem of the results files in benchmarks/results/")
    parser.add_argument("--append", action="store_true",
                        help="add to the existing results file, running only the "
                             "configurations it does not hold yet")
    parser.add_argument("--report", type=Path, default=None,
                        help="only rebuild the table and plot from this results JSON")
    args = parser.parse_args(argv)
    if args.report is not None:
        return report(json.loads(args.report.read_text()), args.report.with_suffix(""))
    budget = 20.0 if args.quick else args.budget
    evaluations = 10 if args.quick else args.evaluations

    chosen: dict[str, list[float]] = {}
    for item in args.lrs or []:
        name, _, value = item.partition("=")
        chosen.setdefault(name, []).append(float(value))
    kfac_args = {}
    for item in args.kfac or []:
        key, _, value = item.partition("=")
        kfac_args[key] = None if value == "None" else json.loads(value)
    specs = []
    for workload in args.workloads:
        specs.append({"workload": workload, "optimizer": "kfac", "lr": None, "kfac": kfac_args})
        for name, lrs in SWEEPS[workload].items():
            lrs = chosen.get(name, lrs)
            for lr in lrs[1:2] if args.quick and name not in chosen else lrs:
                specs.append({"workload": workload, "optimizer": name, "lr": lr})
    for spec in specs:
        spec.update(budget=budget, evaluations=evaluations, seed=args.seed,
                    data_dir=args.data_dir)
    if args.optimizers:
        specs = [s for s in specs if s["optimizer"] in args.optimizers]

    suffix = "_quick" if args.quick else ""
    stem = RESULTS / f"{args.name}{suffix}"
    results: dict[str, list] = {w: [] for w in args.workloads}
    previous = None
    if args.append and stem.with_suffix(".json").exists():
        previous = json.loads(stem.with_suffix(".json").read_text())
        if previous["budget_s"] != budget:
            parser.error(f"--append: the results file has a budget of {previous['budget_s']} s")
        for workload, runs in previous["runs"].items():
            results.setdefault(workload, []).extend(runs)
        done = {(r["workload"], r["optimizer"], r["lr"]) for rs in results.values() for r in rs}
        specs = [s for s in specs if (s["workload"], s["optimizer"], s["lr"]) not in done]
    context = multiprocessing.get_context("spawn")
    for spec in specs:
        with context.Pool(1) as pool:
            run = pool.apply(run_one, (spec,))
        results[spec["workload"]].append(run)
        print(f"{spec['workload']:12s} {spec['optimizer']:13s} lr={spec['lr']!s:8s} "
              f"steps={run['steps']:5d} {run['median_step_ms']:7.1f} ms/step "
              f"final error {run['curve'][-1][2]:.4g}", flush=True)

    command = "python benchmarks/time_to_target.py " + " ".join(argv or sys.argv[1:])
    if previous is not None:
        command = f"{previous['command']}; then {command}"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    record = {"command": command.strip(), "machine": machine, "budget_s": budget,
              "kfac_configs": {w: {**c, **kfac_args} for w, c in KFAC_CONFIGS.items()},
              "sweeps": SWEEPS, "runs": results}
    RESULTS.mkdir(exist_ok=True)
    return report(record, stem)


def report(record: dict, stem: Path) -> dict:
    """Writes `stem`.md, .json and .png from a results record; returns the verdicts."""
    tables, verdicts = [], {}
    for workload, runs in record["runs"].items():
        table, verdicts[workload] = summarise(workload, runs, record["budget_s"],
                                              record.get("kfac_configs", {}).get(workload))
        tables.append(table)
    record["verdicts"] = verdicts
    markdown = "\n\n".join(
        [f"Command: `{record['command']}`  \nMachine: {record['machine']}", *tables])
    stem.with_suffix(".md").write_text(markdown + "\n")
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(record["runs"], stem.with_suffix(".png"))
    print("\n" + markdown)
    return verdicts


if __name__ == "__main__":
    main()
