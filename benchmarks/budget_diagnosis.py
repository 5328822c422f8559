"""Where does a budget run's backward compute go? One finetune run of the benchmark, with the
ledger of every step broken down per layer.

For every sparse layer (forward order) it prints: the share of the batch's rows that were
backpropagated there (rows with a non-zero δ: a skipped sample still gets one below a
BatchNorm in training mode), the mean kept share k / N_l of those rows, and the layer's part
of the run's spent MACs (fixed per row: input gradient zeroing and bias; per kept entry);
then the dense modules' part (BatchNorm, ReLU, pooling: their backward runs for the whole batch)
and the selection's.

    python benchmarks/budget_diagnosis.py --dataset cifar10 --budget 0.2 [--set zeta=1.0]

With ``--gradients`` it also compares, at every step, each layer's weight gradient with the
two dense gradients of the same batch at the same weights (a plain copy of the model, BatchNorm
in training mode): full training's (every sample) and the exact gradient of the trained samples
alone (skipped samples' losses set to 0, the same mean over B). Per layer, the mean over the
steps of the cosines sparse / dense, trained-only / dense, sparse / trained-only, the norm ratio
sparse / dense, and the layer's share of the dense gradient's squared norm: how much of the
step's direction skipping samples loses, and how much the sparse layers lose on top of it.

    python benchmarks/budget_diagnosis.py --dataset cifar10 --budget 0.2 --gradients
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict

import torch

import tinyprop
import tinyprop.budget
import tinyprop.step
from tinyprop.bench import runner, suites
from tinyprop.ledger import layer_backward_macs, step_ledger


class Breakdown:
    """Accumulates the per-layer MACs of every step of a run."""

    def __init__(self):
        self.layers = defaultdict(lambda: defaultdict(int))
        self.order: list[str] = []
        self.other = 0
        self.dense = 0
        self.selection = 0
        self.decision = 0
        self.steps = 0
        self.trained = 0
        self.samples = 0
        self.step_ratios: list[float] = []

    def __call__(self, forward_passes, records, policy, batch_size, trained, output_size,
                 backward_ran):  # fmt: skip
        ledger = step_ledger(
            forward_passes, records, policy, batch_size, trained, output_size, backward_ran
        )
        by_call = {id(record.call): record for record in records}
        for forward_pass in forward_passes:
            if backward_ran:
                self.other += 2 * forward_pass.other_macs
            for call in forward_pass.calls:
                name = call.layer_name
                if name not in self.order:
                    self.order.append(name)
                layer = self.layers[name]
                layer["rows"] += call.rows
                layer["dense"] += call.rows * layer_backward_macs(
                    call, call.output_size, call.input_requires_grad
                )
                layer["entries"] += call.output_size
                record = by_call.get(id(call))
                if record is None:
                    continue
                fixed = layer_backward_macs(call, 0, record.computes_input_grad)
                per_keep = layer_backward_macs(call, 1, record.computes_input_grad) - fixed
                layer["rows_backward"] += record.keep.numel()
                layer["kept"] += int(record.keep.sum())
                layer["kept_possible"] += record.keep.numel() * call.output_size
                layer["fixed"] += record.keep.numel() * fixed
                layer["variable"] += int(record.keep.sum()) * per_keep
                layer["selection"] += record.selection_macs
        self.dense += ledger.backward_dense
        if ledger.backward_dense:
            self.step_ratios.append(ledger.backward_ratio())
        self.selection += ledger.selection
        self.decision += policy.decision_macs(batch_size, output_size)
        self.steps += 1
        self.trained += trained
        self.samples += batch_size
        return ledger

    def report(self) -> dict:
        spent_layers = sum(v["fixed"] + v["variable"] for v in self.layers.values())
        spent = spent_layers + self.other + self.selection
        rows = []
        for name in self.order:
            v = self.layers[name]
            rows.append({
                "layer": name,
                "dense_share": v["dense"] / self.dense,
                "rows_backward": v["rows_backward"] / max(v["rows"], 1),
                "keep": v["kept"] / max(v["kept_possible"], 1),
                "fixed_of_run": v["fixed"] / self.dense,
                "variable_of_run": v["variable"] / self.dense,
            })  # fmt: skip
        return {
            "backward_ratio": spent / self.dense,
            "trained_share": self.trained / max(self.samples, 1),
            "other_of_run": self.other / self.dense,
            "selection_of_run": self.selection / self.dense,
            "layers": rows,
            "step_ratios": self.step_ratios,
        }


class GradientCheck:
    """Wraps ``tinyprop.train_step``: every step's sparse weight gradients against the dense
    ones of the same batch at the same weights (see the module docstring)."""

    PAIRS = ("sparse_dense", "trained_dense", "sparse_trained")

    def __init__(self):
        self.plain = None  # a plain copy of the model (tinyprop removed), reloaded every step
        self.sums = defaultdict(lambda: defaultdict(float))
        self.order: list[str] = []
        self.steps = 0
        self._train_step = tinyprop.train_step

    def __call__(self, model, x, y, loss_fn, optimizer, **options):
        if self.plain is None:
            self.plain = tinyprop.remove(copy.deepcopy(model))
        names = dict(self.plain.state_dict())
        self.plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in names})
        stats = self._train_step(model, x, y, loss_fn, optimizer, **options)
        self.compare(model, x, y, loss_fn, stats.trained_mask)
        return stats

    def compare(self, model, x, y, loss_fn, trained_mask) -> None:
        weights = {
            name: parameter
            for name, parameter in self.plain.named_parameters()
            if parameter.dim() > 1  # the Linear / Conv weights
        }
        self.plain.train()
        losses = loss_fn(self.plain(x), y)  # (B,)
        dense = torch.autograd.grad(losses.mean(), list(weights.values()), retain_graph=True)
        mask = trained_mask.to(losses.dtype) if trained_mask is not None else 1.0
        trained = torch.autograd.grad(
            (losses * mask).sum() / len(losses), list(weights.values()), allow_unused=True
        )
        sparse_of = dict(model.named_parameters())
        norms = [float(g.pow(2).sum()) for g in dense]
        total = sum(norms) or 1.0
        self.steps += 1
        for (name, _), full, only, norm in zip(weights.items(), dense, trained, norms, strict=True):
            if name not in self.order:
                self.order.append(name)
            grad = sparse_of[name].grad
            sparse = torch.zeros_like(full) if grad is None else grad
            only = torch.zeros_like(full) if only is None else only
            entry = self.sums[name]
            entry["share"] += norm / total
            for pair, (a, b) in zip(
                self.PAIRS, ((sparse, full), (only, full), (sparse, only)), strict=True
            ):
                entry[pair] += _cosine(a, b)
            entry["norm_ratio"] += float(sparse.norm()) / max(float(full.norm()), 1e-30)

    def report(self) -> list[dict]:
        steps = max(self.steps, 1)
        return [
            {"layer": name, **{key: value / steps for key, value in self.sums[name].items()}}
            for name in self.order
        ]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b), 0 when either is zero."""
    denominator = float(a.norm()) * float(b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--policy", default="tinypropv2")
    parser.add_argument("--protocol", default="finetune")
    parser.add_argument("--budget", type=float, default=0.2, help="0: no budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="config fields, e.g. zeta=1.0")
    parser.add_argument("--json", help="also write the breakdown and metrics here")
    parser.add_argument(
        "--gradients", action="store_true", help="compare each step's gradients with dense ones"
    )
    parser.add_argument(
        "--controller", nargs="*", default=[], help="budget constants, e.g. HORIZON=60 GAIN=0.2"
    )
    args = parser.parse_args()
    settings = {"budget": args.budget} if args.policy != "full" and args.budget else {}
    settings.update({k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)})
    suite = suites.get("budget")
    spec = runner.RunSpec(
        suite=suite.name, dataset=args.dataset, protocol=args.protocol, policy=args.policy,
        settings=settings, seed=args.seed, plan=suite.datasets[args.dataset],
        val_fraction=suite.val_fraction, pretrain_fraction=suite.pretrain_fraction,
        min_val_samples=suite.min_val_samples, commit="diagnosis",
    )  # fmt: skip
    for item in args.controller:
        name, value = item.split("=", 1)
        setattr(tinyprop.budget, name, parse_value(value))
    breakdown = Breakdown()
    tinyprop.step.step_ledger = breakdown
    check = GradientCheck() if args.gradients else None
    if check is not None:
        tinyprop.train_step = check  # the bench's training loop calls tinyprop.train_step
    record = runner.execute_run(spec, write=False)
    result = breakdown.report()
    if check is not None:
        result["gradients"] = check.report()
    print(
        f"{args.dataset} {args.policy} {settings}: metric {record['metric']:.2f} "
        f"(val {record['val_metric']:.2f}, pretrained {record['pretrained_metric']}), "
        f"backward {100 * record['backward_ratio']:.2f}%, trained share "
        f"{100 * result['trained_share']:.1f}%"
    )
    print(
        f"dense modules {100 * result['other_of_run']:.2f}% of full's backward, "
        f"selection {100 * result['selection_of_run']:.2f}%"
    )
    print(f"{'layer':28s} {'dense%':>7s} {'rows%':>6s} {'k/N%':>6s} {'fixed%':>7s} {'var%':>6s}")
    for row in result["layers"]:
        print(
            f"{row['layer'][:28]:28s} {100 * row['dense_share']:7.2f} "
            f"{100 * row['rows_backward']:6.1f} {100 * row['keep']:6.2f} "
            f"{100 * row['fixed_of_run']:7.2f} {100 * row['variable_of_run']:6.2f}"
        )
    if check is not None:
        print(
            "gradients, mean over the steps: cos(sparse, dense), cos(trained only, dense), "
            "cos(sparse, trained only), |sparse| / |dense|, share of |dense|^2"
        )
        for row in result["gradients"]:
            print(
                f"{row['layer'][:28]:28s} {row['sparse_dense']:6.3f} {row['trained_dense']:6.3f} "
                f"{row['sparse_trained']:6.3f} {row['norm_ratio']:6.3f} {100 * row['share']:6.2f}%"
            )
    ratios = result["step_ratios"]
    tenth = max(len(ratios) // 10, 1)
    print("step ratio by tenth of the run:", " ".join(
        f"{100 * sum(ratios[i:i + tenth]) / len(ratios[i:i + tenth]):.0f}"
        for i in range(0, len(ratios), tenth)
    ))  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"record": record, "breakdown": result}, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
