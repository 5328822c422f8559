"""meProp's unified top-k beside per-sample selection at equal compute: accuracy and wall time.

Each policy (``topk``, ``tinypropv2``) trains the bench's fine-tuning run (small suite) with the
budget controller at the same backward budget, once with per-sample selection and once with
``unified=True`` (one kept index set per layer call); both reach the budget, so the accuracy
difference is what the shared index set costs (or gains) at equal compute. The dense ``full``
run is the reference. Every finished run is kept in the output file, so an interrupted sweep
resumes where it stopped. (The records keep each run's wall time too; runs of a sweep are not
interleaved, so those are no speed figures: benchmarks/speed.py measures speed.)

Run:
    python benchmarks/unified_accuracy.py                       # har and mnist, budget 0.1
    python benchmarks/unified_accuracy.py --datasets har --budget 0.2 --seeds 0 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from tinyprop.bench import runner, suites

# policy -> its settings besides the budget: as the bench's budget records (meProp's top-k keeps
# its output layer dense)
POLICIES = {"topk": {"dense_output_layer": True}, "tinypropv2": {}}


def plan(dataset: str, budget: float, seed: int) -> dict[str, runner.RunSpec]:
    """label -> run: full, and every policy at the budget, per-sample and unified."""

    def spec(policy: str, settings: dict) -> runner.RunSpec:
        (run,) = runner.plan_runs(
            suites.get("small"), "finetune", "/nonexistent", datasets=[dataset],
            policies=[policy], seeds=[seed], max_settings=1,
        )  # fmt: skip
        return dataclasses.replace(run, settings=settings)

    runs = {"full": spec("full", {})}
    for policy, settings in POLICIES.items():
        settings = {"budget": budget, **settings}
        runs[f"{policy} per-sample"] = spec(policy, settings)
        runs[f"{policy} unified"] = spec(policy, {**settings, "unified": True})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["har", "mnist"])
    parser.add_argument("--budget", type=float, default=0.1, help="backward budget b")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "unified_accuracy.json")
    )
    args = parser.parse_args()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    done["command"] = "python " + " ".join(sys.argv)
    for dataset in args.datasets:
        for seed in args.seeds:
            runs = plan(dataset, args.budget, seed)
            pretrained = None
            for label, spec in runs.items():
                key = f"{dataset} b={args.budget} seed{seed} {label}"
                if key in done["runs"]:
                    continue
                if pretrained is None:
                    pretrained = runner.pretrained_state(runs["full"])
                record = runner.execute_run(spec, pretrained, write=False)
                done["runs"][key] = {
                    field: record[field]
                    for field in (
                        "dataset", "policy", "settings", "seed", "metric_name", "metric",
                        "compute_ratio", "backward_ratio", "skip_rate", "train_wall_s",
                    )
                }  # fmt: skip
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(done, indent=2) + "\n")  # resumable
        print(f"\n{dataset} finetune (small suite), budget {args.budget}, seeds {args.seeds}")
        print("| run                   | metric (mean) | backward vs full |")
        print("|-----------------------|---------------|------------------|")
        for label in plan(dataset, args.budget, args.seeds[0]):
            rows = [done["runs"][f"{dataset} b={args.budget} seed{s} {label}"] for s in args.seeds]
            metric = statistics.mean(row["metric"] for row in rows)
            backward = statistics.mean(row["backward_ratio"] for row in rows)
            print(f"| {label:<21} | {metric:>13.2f} | {backward:>16.3f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
