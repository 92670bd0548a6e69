"""Untuned benchmark suite: K-FAC at its defaults against tuned Adam, Muon, SGD and Lion.

    python benchmarks/suite.py --data-dir path/to/mnist                  # the full suite
    python benchmarks/suite.py --data-dir path/to/mnist --quick          # < 10 minutes
    python benchmarks/suite.py --problems transformer regression --budget 30
    python benchmarks/suite.py --report benchmarks/results/suite.json   # rebuild md/png

Every problem (benchmarks/suite_problems.py) is written as an ordinary Keras
user would write it: Keras's default initialisers, a standard Keras loss with
its default reduction, a usual batch size. K-FAC runs as
`tf_kfac.KFAC(seed=seed)` with no other argument on every problem; the one
exception is `autoencoder_paper`, the paper's setup (sparse initialisation,
cross-entropy summed over the pixels), where K-FAC gets the paper's
`l2_reg=1e-5` and the report says so. Each baseline (`keras.optimizers.Adam`,
`Muon` at its defaults, `SGD(momentum=0.9, nesterov=True)` and `Lion`) gets a
sweep of 3 learning rates (`SWEEPS`) and keeps its best.

* `autoencoder`: the MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784,
  Glorot init, mean binary cross-entropy, batch 1000, on the 10,000 test
  images; error = squared reconstruction error per case on all of them.
* `autoencoder_paper`: the same in the paper's setup (see above).
* `convnet`: examples/mnist_convnet.py's classifier, batch 128, 80/20 split of
  the test images; error = held-out classification error in %.
* `transformer`: 2 post-norm encoder blocks; the label is the order of four
  marker tokens in random sequences (24 classes); batch 64; held-out error %.
* `sequence`: Conv1D classifier counting the copies (1-4) of a motif in a
  noisy signal; batch 64; held-out error %.
* `recurrent`: the same motif counting with an LSTM(64) classifier; batch 64;
  held-out error %.
* `regression`: 256-256-256 relu MLP fitted with MSE to a random tanh teacher
  with 64 outputs, batch 256; held-out MSE.

The MNIST problems read the IDX files in `--data-dir` (gzipped or not), or
tensorflow_datasets's `mnist` without it; the others generate their data from
the seed. Every run has its own process, one after the other, with the same
initial weights and data order as the others, and trains for the problem's
budget of training seconds; evaluations and the first step (tracing) are not
charged to its clock (as in benchmarks/time_to_target.py). Writes
`benchmarks/results/suite[_quick].{json,md,png}`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # also in the runs' processes

from suite_problems import BATCH, BUILDERS, MNIST_PROBLEMS, UNITS  # noqa: E402
from time_to_target import time_to  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROBLEMS = tuple(BUILDERS)
OPTIMIZERS = ("kfac", "adam", "muon", "sgd_nesterov", "lion")

# Learning-rate sweeps, a factor ~3 apart (the middle value is the one --quick runs).
_DEFAULT_SWEEP = {"adam": [3e-4, 1e-3, 3e-3], "muon": [1e-3, 3e-3, 1e-2],
                  "sgd_nesterov": [1e-2, 3e-2, 1e-1], "lion": [3e-5, 1e-4, 3e-4]}
SWEEPS = {
    # The mean over 784 pixels makes the gradient 784 times smaller than the
    # paper's summed objective, for which SGD's best rates are 1e-3 to 3e-3.
    "autoencoder": {**_DEFAULT_SWEEP, "muon": [3e-3, 1e-2, 3e-2],
                    "sgd_nesterov": [0.3, 1.0, 3.0]},
    "autoencoder_paper": {**_DEFAULT_SWEEP, "muon": [3e-3, 1e-2, 3e-2],
                          "sgd_nesterov": [1e-3, 3e-3, 1e-2]},
    "convnet": dict(_DEFAULT_SWEEP),
    "transformer": dict(_DEFAULT_SWEEP),
    "sequence": dict(_DEFAULT_SWEEP),
    "recurrent": dict(_DEFAULT_SWEEP),
    "regression": dict(_DEFAULT_SWEEP),
}
# K-FAC's arguments besides the seed: none, except in the paper's setup.
KFAC_CONFIGS = {"autoencoder_paper": {"l2_reg": 1e-5}}
# Training seconds a run. 13 runs a problem; with start-up, tracing and
# evaluations the full suite takes about 73 minutes on 2 cores.
BUDGETS = {"autoencoder": 60.0, "autoencoder_paper": 60.0, "convnet": 30.0,
           "transformer": 30.0, "sequence": 30.0, "recurrent": 30.0, "regression": 30.0}
EVALUATIONS, QUICK_BUDGET, QUICK_EVALUATIONS = 12, 3.0, 3
# What a run costs besides its budget, to plan the total (seconds on 2 cores):
# process start-up, tracing (the first step and the first evaluation) and each
# evaluation of the error.
STARTUP_S = 8.0
TRACE_S = {"autoencoder": 4.0, "autoencoder_paper": 4.0, "convnet": 1.5,
           "transformer": 3.0, "sequence": 1.0, "recurrent": 2.0, "regression": 1.0}
EVAL_S = {"autoencoder": 1.0, "autoencoder_paper": 1.0, "convnet": 0.2,
          "transformer": 0.25, "sequence": 0.1, "recurrent": 0.5, "regression": 0.1}
# Error levels to report the time to (lower is better).
THRESHOLDS = {
    "autoencoder": [50.0, 30.0, 20.0, 10.0],
    "autoencoder_paper": [30.0, 15.0, 10.0, 5.0],
    "convnet": [5.0, 3.0, 2.0, 1.5],
    "transformer": [50.0, 20.0, 10.0, 5.0],
    "sequence": [40.0, 25.0, 20.0, 15.0],
    "recurrent": [40.0, 25.0, 20.0, 15.0],
    "regression": [0.5, 0.25, 0.15, 0.1],
}


def make_optimizer(name: str, lr: float | None, problem: str, seed: int,
                   kfac_args: dict | None = None):
    """The optimizer of a run: K-FAC as configured for the problem (plus `kfac_args`,
    from --kfac), or a baseline at `lr`."""
    import keras

    import tf_kfac

    if name == "kfac":
        return tf_kfac.KFAC(seed=seed, **{**KFAC_CONFIGS.get(problem, {}), **(kfac_args or {})})
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "muon":
        return keras.optimizers.Muon(learning_rate=lr)
    if name == "sgd_nesterov":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True)
    if name == "lion":
        return keras.optimizers.Lion(learning_rate=lr)
    raise ValueError(f"Unknown optimizer {name!r}; expected one of {OPTIMIZERS}.")


def run_one(spec: dict) -> dict:
    """Trains one optimizer on one problem for the budget (in a fresh process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(spec["seed"])
    problem = BUILDERS[spec["problem"]](spec["seed"], spec["data_dir"])
    model = problem.model
    model.compile(optimizer=make_optimizer(spec["optimizer"], spec["lr"], spec["problem"],
                                           spec["seed"], spec.get("kfac_args")),
                  **problem.compile_kwargs)
    budget, evals = spec["budget"], spec["evaluations"]

    from clock import TrainingClock

    clock = TrainingClock(lambda: problem.error(model), budget, evals)
    model.fit(problem.data, steps_per_epoch=problem.steps_per_epoch, epochs=10**6,
              shuffle=False, verbose=0, callbacks=[clock])  # the pipeline shuffles
    warm = clock.step_times[5:] or clock.step_times or [float("nan")]
    return {**spec, "curve": clock.curve, "steps": clock.steps,
            "median_step_ms": 1e3 * statistics.median(warm), "first_step_s": clock.first_step,
            "eval_s": clock.eval_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_in_process(spec: dict) -> dict:
    """`run_one` in its own spawned process; a failure is recorded, not raised."""
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            run = pool.submit(run_one, spec).result()
        except Exception as error:  # noqa: BLE001 (a crash or an error in the run)
            message = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
            run = {**spec, "failed": message[:300], "curve": []}
    return {**run, "wall_s": time.perf_counter() - start}


def final(run: dict) -> float:
    """The run's last error (NaN for a failed run)."""
    return run["curve"][-1][2] if run.get("curve") else float("nan")


def _label(run: dict) -> str:
    if run["optimizer"] != "kfac":
        return f"{run['optimizer']} {run['lr']:g}"
    config = {**KFAC_CONFIGS.get(run["problem"], {}), **(run.get("kfac_args") or {})}
    return "kfac " + (", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in config.items()) or "defaults")


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def summarise(problem: str, runs: list[dict], budget: float) -> tuple[str, dict]:
    """A markdown section for one problem, and its verdict."""
    best = {}
    for r in runs:
        if r["optimizer"] != "kfac" and math.isfinite(final(r)):
            if r["optimizer"] not in best or final(r) < final(best[r["optimizer"]]):
                best[r["optimizer"]] = r
    kfac = next((r for r in runs if r["optimizer"] == "kfac"), None)
    levels = THRESHOLDS[problem]
    setup = (f"; paper's setup: {_label({'optimizer': 'kfac', 'problem': problem})}, the "
             "only problem with a K-FAC argument" if problem in KFAC_CONFIGS else "")
    lines = [f"### {problem} ({UNITS[problem]}, lower is better; batch {BATCH[problem]}; "
             f"{budget:g} s of training a run{setup})", "",
             "| optimizer | final error | " + " | ".join(f"time to ≤ {t:g}" for t in levels)
             + " | steps | ms/step | peak RSS MB |",
             "|---|---|" + "---|" * len(levels) + "---|---|---|"]
    for r in sorted(runs, key=lambda r: (not math.isfinite(final(r)), final(r))):
        if r.get("failed"):
            lines.append(f"| {_label(r)} | failed: {r['failed']} |" + " |" * (len(levels) + 3))
            continue
        swept = sum(o["optimizer"] == r["optimizer"] for o in runs) > 1
        mark = " (best)" if swept and best.get(r["optimizer"]) is r else ""
        cells = [_label(r) + mark, f"{final(r):.4g}",
                 *(_seconds(time_to(r["curve"], t)) for t in levels),
                 str(r["steps"]), f"{r['median_step_ms']:.1f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    verdict: dict = {"best_lr": {name: r["lr"] for name, r in best.items()}}
    if best:
        lines += ["", "Best learning rates: " + ", ".join(
            f"{name} {r['lr']:g} ({final(r):.4g})" for name, r in best.items()) + "."]
    if kfac and not kfac.get("failed") and best:
        k = final(kfac)
        top = min(best.values(), key=final)
        reach = time_to(kfac["curve"], final(top))
        verdict.update(kfac_final=k, best_baseline=_label(top), best_baseline_final=final(top),
                       kfac_time_to_best_baseline_final=reach)
        words = []
        for name in ("adam", "muon"):
            if name in best:
                beats = verdict[f"kfac_beats_{name}"] = bool(k < final(best[name]))
                words.append(f"{'' if beats else 'not '}below the best {name.capitalize()}'s "
                             f"({final(best[name]):.4g})")
        lines += ["", f"Verdict: K-FAC ends at {k:.4g}" + "".join(", " + w for w in words)
                  + "; it " + ("never reaches" if reach is None else f"reaches after {reach:.1f} s")
                  + f" the best baseline's final error ({final(top):.4g}, {_label(top)})."]
    elif kfac and kfac.get("failed"):
        verdict.update(kfac_beats_adam=False if "adam" in best else None,
                       kfac_beats_muon=False if "muon" in best else None)
        lines += ["", "Verdict: K-FAC failed on this problem."]
    return "\n".join(lines), verdict


def overall(verdicts: dict) -> str:
    parts = []
    for name in ("adam", "muon"):
        known = [v[f"kfac_beats_{name}"] for v in verdicts.values()
                 if v.get(f"kfac_beats_{name}") is not None]
        if known:
            parts.append(f"beats the best {name.capitalize()} on {sum(known)} of {len(known)} "
                         "problems")
    return ("Summary: K-FAC's final error " + " and ".join(parts) + "."
            if parts else "Summary: no K-FAC-against-baseline comparison in these runs.")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(record["runs"])
    cols = min(3, len(problems))
    rows = math.ceil(len(problems) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    colors = dict(zip(OPTIMIZERS, ("black", "tab:blue", "tab:red", "tab:green", "tab:purple"),
                      strict=True))
    for ax, problem in zip(axes.flat, problems, strict=False):
        runs = record["runs"][problem]
        best_lr = record.get("verdicts", {}).get(problem, {}).get("best_lr", {})
        for r in runs:
            points = [p for p in r["curve"] if p[2] > 0]
            if not points:
                continue
            kfac, chosen = r["optimizer"] == "kfac", best_lr.get(r["optimizer"]) == r["lr"]
            ax.plot([p[0] for p in points], [p[2] for p in points], label=_label(r),
                    color=colors[r["optimizer"]], linewidth=2.5 if kfac else 1.4,
                    linestyle="-" if kfac or chosen else ":", alpha=1 if kfac or chosen else 0.6)
        title = problem + (" (paper's setup)" if problem in KFAC_CONFIGS else "")
        ax.set(yscale="log", xlabel="training seconds", ylabel=UNITS[problem], title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(problems):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(record: dict, stem: Path) -> dict:
    """Writes `stem`.md, .json and .png from a results record; returns the verdicts."""
    tables, verdicts = [], {}
    for problem, runs in record["runs"].items():
        table, verdicts[problem] = summarise(problem, runs, record["budgets"][problem])
        tables.append(table)
    record["verdicts"], record["summary"] = verdicts, overall(verdicts)
    head = [f"Command: `{record['command']}`  ", f"Machine: {record['machine']}  ",
            "K-FAC: `tf_kfac.KFAC(seed=seed)` on every problem except the paper's setup; "
            "baselines: best of a 3-value learning-rate sweep each"
            + (" (--quick: one value)" if record.get("quick") else "") + ".  "]
    if record.get("total_wall_s") is not None:
        head.append(f"Total wall time: {record['total_wall_s'] / 60:.1f} min.")
    markdown = "\n\n".join(["\n".join(head), record["summary"], *tables])
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(markdown + "\n")
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(record, stem.with_suffix(".png"))
    print("\n" + markdown)
    return verdicts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None,
                        help="folder with the MNIST IDX files, e.g. path/to/mnist "
                             "(default: tensorflow_datasets 'mnist')")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=OPTIMIZERS)
    parser.add_argument("--budget", type=float, default=None,
                        help="training seconds a run, for every problem (default: BUDGETS)")
    parser.add_argument("--evaluations", type=int, default=None,
                        help=f"error evaluations a run ({EVALUATIONS}; "
                             f"--quick: {QUICK_EVALUATIONS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (0)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_BUDGET:g} s a run and one learning rate per baseline")
    parser.add_argument("--name", default="suite",
                        help="stem of the results files in benchmarks/results/ (suite)")
    parser.add_argument("--kfac", type=json.loads, default=None,
                        help='K-FAC arguments besides the defaults, as JSON, for every problem '
                             '(e.g. \'{"weight_sharing": "reduce"}\')')
    parser.add_argument("--plan", action="store_true",
                        help="only print the runs and the planned total time")
    parser.add_argument("--report", type=Path, default=None,
                        help="only rebuild the markdown and plot from this results JSON")
    args = parser.parse_args(argv)
    if args.report is not None:
        return report(json.loads(args.report.read_text()), args.report.with_suffix(""))
    if args.budget is not None and args.budget <= 0:
        parser.error("--budget must be positive")
    evaluations = args.evaluations or (QUICK_EVALUATIONS if args.quick else EVALUATIONS)
    budgets = {p: args.budget or (QUICK_BUDGET if args.quick else BUDGETS[p])
               for p in args.problems}

    specs = []
    for problem in args.problems:
        for name in args.optimizers:
            lrs = SWEEPS[problem][name] if name != "kfac" else [None]
            for lr in lrs[1:2] if args.quick and name != "kfac" else lrs:
                specs.append({"problem": problem, "optimizer": name, "lr": lr,
                              "budget": budgets[problem], "evaluations": evaluations,
                              "seed": args.seed, "kfac_args": args.kfac,
                              "data_dir": args.data_dir if problem in MNIST_PROBLEMS else None})
    planned = sum(STARTUP_S + s["budget"] + TRACE_S[s["problem"]]
                  + (evaluations + 1) * EVAL_S[s["problem"]] for s in specs)
    print(f"{len(specs)} runs; planned total about {planned / 60:.1f} min "
          f"({sum(s['budget'] for s in specs) / 60:.1f} min of training)", flush=True)
    if args.plan:
        return {}

    start = time.perf_counter()
    results: dict[str, list] = {p: [] for p in args.problems}
    for spec in specs:
        run = run_in_process(spec)
        run.pop("data_dir", None)  # this machine's path: not part of the record
        results[spec["problem"]].append(run)
        outcome = (f"FAILED {run['failed']}" if run.get("failed") else
                   f"steps={run['steps']:6d} {run['median_step_ms']:7.1f} ms/step "
                   f"final error {final(run):.4g}")
        print(f"{spec['problem']:17s} {_label(run):20s} {outcome} ({run['wall_s']:.0f} s)",
              flush=True)
    total = time.perf_counter() - start

    words = list(sys.argv[1:] if argv is None else argv)
    # The data directory is this machine's; the record names the option only.
    words = ["DIR" if i and words[i - 1] == "--data-dir" else w for i, w in enumerate(words)]
    command = "python benchmarks/suite.py " + " ".join(words)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    record = {"command": command.strip(), "machine": machine, "quick": args.quick,
              "seed": args.seed, "evaluations": evaluations, "budgets": budgets,
              "sweeps": {p: SWEEPS[p] for p in args.problems},
              "kfac_configs": {p: KFAC_CONFIGS.get(p, {}) for p in args.problems},
              "thresholds": {p: THRESHOLDS[p] for p in args.problems},
              "planned_s": planned, "total_wall_s": total, "runs": results}
    verdicts = report(record, RESULTS / (args.name + ("_quick" if args.quick else "")))
    print(f"\nTotal wall time: {total:.0f} s ({total / 60:.1f} min; planned {planned / 60:.1f})")
    return verdicts


if __name__ == "__main__":
    main()
