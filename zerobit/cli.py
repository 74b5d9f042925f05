"""Command line: zerobit train | compress | eval | export | sweep | report | demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _cmd_train(args: argparse.Namespace) -> int:
    from zerobit import zoo
    from zerobit.train.train import TrainRecipe, train_zoo_model

    try:  # the recipe recorded on the committed card, so `zerobit train --model NAME` reproduces it
        recorded = zoo.card(args.model)["recipe"]
    except (FileNotFoundError, KeyError, ValueError):
        recorded = {}
    base = {k: v for k, v in recorded.items() if k in TrainRecipe.__dataclass_fields__}
    if recorded.get("bf16"):  # cards written before precision was a setting
        base["precision"] = "auto"
    recipe = TrainRecipe(**(base | ({"epochs": args.epochs} if args.epochs else {}) | {"seed": args.seed}))
    card = train_zoo_model(args.model, recipe, out_dir=args.out, progress=not args.quiet, device=args.device)
    print(json.dumps({k: card[k] for k in ("model", "test_accuracy", "seconds") if k in card}))
    return 0


def parse_options(items: list[str]) -> dict:
    """['episodes=300', 'checkpoint=a.state', 'prune=false', 'bits=2,4,8'] → typed strategy options."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"strategy option {item!r} must look like KEY=VALUE")
        low = text.lower()
        if low in ("true", "false"):
            options[key] = low == "true"
            continue
        if "," in text and all(part.strip().isdigit() for part in text.split(",")):  # bits=2,4,8
            options[key] = tuple(int(part) for part in text.split(","))
            continue
        for kind in (int, float):
            try:
                options[key] = kind(text)
                break
            except ValueError:
                continue
        else:
            options[key] = text
    return options


def run_compress(model_name: str, data: str, budget: str, strategy: str, finetune_epochs: float, out: str,
                 act_bits: int = 8, seed: int = 0, progress: bool = True, options: dict | None = None,
                 device: str = "auto", finetune: dict | None = None, task: str = "classification",
                 extra: dict | None = None, channel_multiple: int | None = None) -> dict:
    """Compress a zoo model and write DIR/model.zbit, DIR/policy.json and DIR/result.json; returns the result.

    `finetune` sets other FinetuneConfig fields (e.g. {"lr": 0.02}); `extra` is added to result.json. `task`
    "distillation" never reads the labels (the metric is the output similarity); `top1_accuracy` is then measured
    on the test labels afterwards.
    """
    from zerobit import FinetuneConfig, compress, parse_budget, zoo
    from zerobit.data import get_splits
    from zerobit.strategies import get_strategy

    torch.manual_seed(seed)
    strat = get_strategy(strategy, **(options or {}))
    splits = get_splits(data)
    model = zoo.load_pretrained(model_name)
    config = {"epochs": finetune_epochs, "seed": seed} | (finetune or {})
    if config.get("processes", 1) == 1:  # a killed run, started again, goes on from its last fine-tune epoch
        Path(out).mkdir(parents=True, exist_ok=True)
        config.setdefault("checkpoint", str(Path(out) / "finetune.state"))
    result = compress(model, zoo.example_input(model_name), parse_budget(budget), strat,
                      train_data=splits.train, eval_data=splits.val, test_data=splits.test,
                      finetune_config=FinetuneConfig(**config), act_bits=act_bits, model_name=model_name,
                      progress=progress, device=device, task=task, channel_multiple=channel_multiple)
    fields = {"budget_text": budget, "finetune_epochs": finetune_epochs, "data": data, "task": task, "seed": seed,
              "channel_multiple": result.info["channel_multiple"]}
    if task != "classification":  # judged without labels; the labels say how well it still classifies
        from zerobit.train.evaluate import accuracy

        fields |= {"task_metric": result.accuracy, "top1_accuracy": accuracy(result.model, splits.test),
                   "baseline_top1_accuracy": accuracy(model, splits.test)}
    summary = result.save_folder(out, fields | (extra or {}))
    if config.get("checkpoint"):  # the run is done: its files are written
        Path(config["checkpoint"]).unlink(missing_ok=True)
    summary["_result"] = result
    return summary


def _cmd_compress(args: argparse.Namespace) -> int:
    summary = run_compress(args.model, args.data, args.budget, args.strategy, args.finetune_epochs, args.out,
                           args.act_bits, args.seed, not args.quiet, parse_options(args.option), args.device,
                           finetune=_processes(args), task=args.task, channel_multiple=args.channel_multiple)
    result = summary.pop("_result")
    print(result.policy)
    print(result.summary())
    print(f"wrote {args.out}/model.zbit ({summary['file_bytes']:,} bytes; budget {summary['budget_limit']:,.0f} "
          f"{summary['budget_unit']})")
    print(_report_of(args.out))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from zerobit import load
    from zerobit.data import get_splits
    from zerobit.train.evaluate import accuracy

    model = load(args.file, device=args.device)
    acc = accuracy(model, get_splits(args.data).test)
    out = {"file": args.file, "file_bytes": os.path.getsize(args.file), "accuracy": acc, "data": args.data,
           "device": args.device}
    print(json.dumps(out) if args.json else f"{args.file}: {out['file_bytes']:,} bytes, test accuracy {acc:.2%}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from zerobit.data import get_splits
    from zerobit.export.onnx import export_onnx, parity
    from zerobit.export.runtime import load

    if args.format != "onnx":
        raise ValueError(f"unknown format {args.format!r}: zerobit exports onnx")
    splits = get_splits(args.data) if args.data else None
    calibration = splits.train.subset(512) if splits is not None else None
    report = export_onnx(args.file, args.out, calibration_data=calibration, mode=args.mode, int4=not args.no_int4)
    print(report.summary())
    for layer, kind in report.layers.items():
        if not kind.startswith(("int", "uint")):
            print(f"  {layer}: {kind}")
    if splits is not None and not args.no_check:
        found = parity(args.out, load(args.file), splits.test)
        print(f"onnxruntime vs the .zbit model on {found['samples']:,} test images: {found['agreement']:.2%} same "
              f"prediction, largest output difference {found['max_abs_diff']:.4f}")
    return 0


def _processes(args: argparse.Namespace) -> dict:
    """FinetuneConfig fields of --processes (only when it asks for more than one process)."""
    return {"processes": args.processes} if args.processes != 1 else {}


def split_budgets(text: str) -> list[str]:
    """'1/16,1/32,latency=1/4,batch=64' → ['1/16', '1/32', 'latency=1/4,batch=64'] (a latency's settings stay)."""
    budgets: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part.startswith(("batch=", "threads=")) and budgets:
            budgets[-1] += "," + part
        elif part:
            budgets.append(part)
    return budgets


def _cmd_sweep(args: argparse.Namespace) -> int:
    from zerobit.sweeps import sweep

    options: dict[str, list[str]] = {}
    for item in args.option:
        strategy, sep, setting = item.partition(":")
        if not sep:
            raise ValueError(f"sweep option {item!r} must look like STRATEGY:KEY=VALUE (e.g. ajpq:episodes=60)")
        options.setdefault(strategy, []).append(setting)
    summary = sweep(split_budgets(args.budgets), [s.strip() for s in args.strategies.split(",") if s.strip()],
                    args.out, model=args.model, data=args.data, finetune_epochs=args.finetune_epochs,
                    seed=args.seed, options={k: parse_options(v) for k, v in options.items()},
                    finetune=_processes(args), device=args.device,
                    ray_address=args.ray_address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                    progress=not args.quiet)
    failed = [r for r in summary["runs"] if r["status"] != "done"]
    print(f"sweep: {len(summary['runs']) - len(failed)} of {len(summary['runs'])} runs done in "
          f"{summary['wall_seconds']:.0f} s; results in {args.out}/runs")
    for r in failed:
        print(f"  {r['name']}: {r['status']} {r.get('error', '')}")
    if "report" in summary:
        print(f"report: {summary['report']}")
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from zerobit.report import write_report

    print(f"report: {write_report(args.folder, run=args.run, out=args.out)}")
    return 0


def _report_of(folder: str) -> str:
    """Write FOLDER/report.html for a compress run; returns a line saying where (or why not)."""
    try:
        from zerobit.report import write_report

        return f"report: {write_report(folder)}"
    except ImportError as exc:  # matplotlib missing
        return f"(no report: {exc})"


def _cmd_demo(args: argparse.Namespace) -> int:
    from zerobit.device import resolve

    start = time.perf_counter()
    print(f"zerobit demo: compress the pretrained ResNet-20 to {args.budget} of its fp32 file "
          f"({args.strategy}, {args.finetune_epochs:g} fine-tune epochs, on {resolve(args.device)}) on "
          "Fashion-MNIST\n")
    summary = run_compress("resnet20", "fashion-mnist", args.budget, args.strategy, args.finetune_epochs, args.out,
                           device=args.device)
    result = summary.pop("_result")
    print(result.policy, "\n")
    print(result.summary())
    print(f"\nfile {args.out}/model.zbit: {summary['file_bytes']:,} bytes "
          f"(budget {summary['budget_limit']:,.0f}); total {time.perf_counter() - start:.0f} s")
    print(_report_of(args.out))
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `zerobit sweep` command and its flags."""
    w = sub.add_parser("sweep", help="compress under several budgets with several strategies (Ray or here)")
    w.add_argument("--model", default="resnet20")
    w.add_argument("--data", default="fashion-mnist")
    w.add_argument("--budgets", required=True, help="comma-separated, as --budget of compress: 1/16,1/32,bops=1/64")
    w.add_argument("--strategies", default="uniform,opq,ajpq", help="comma-separated strategy names")
    w.add_argument("--option", action="append", default=[], metavar="STRATEGY:KEY=VALUE",
                   help="a strategy's setting, repeatable (e.g. --option ajpq:episodes=60)")
    w.add_argument("--finetune-epochs", type=float, default=1.0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", required=True, help="folder of the sweep (started again, it resumes)")
    w.add_argument("--ray-address", default=None, help="run each compress as a Ray task: 'local' (a Ray instance "
                   "here), 'auto' (this machine's cluster) or HOST:PORT; default: here, one run after another")
    w.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray CPUs of each run")
    w.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray GPUs of each run (0.25: four share one)")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=_cmd_sweep)
    return w


def _add_compress(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compress", help="compress a zoo model under a budget")
    c.add_argument("--model", default="resnet20")
    c.add_argument("--data", default="fashion-mnist")
    c.add_argument("--budget", required=True, help="1/32 (of fp32 file), 40KB, 40000B, bops=1/64, macs=1/4, "
                   "latency=2.5ms (onnxruntime, batch 1, 1 thread), latency=1/4,batch=64,threads=2")
    c.add_argument("--strategy", default="uniform", help="uniform, sequential, opq, admm, ajpq, sbs")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy setting, repeatable (e.g. --option episodes=300 --option checkpoint=s.state)")
    c.add_argument("--finetune-epochs", type=float, default=1.0)
    c.add_argument("--act-bits", type=int, default=8)
    c.add_argument("--channel-multiple", type=int, default=None, metavar="N",
                   help="keep a multiple of N channels per group (8: faster onnxruntime kernels; see README). "
                   "Default: 8 under a latency budget such widths reach, else 1")
    c.add_argument("--task", default="classification", choices=["classification", "distillation"],
                   help="distillation: no labels, match the original model's outputs")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_cmd_compress)
    return c


def _add_export(sub) -> argparse.ArgumentParser:
    x = sub.add_parser("export", help="write a .zbit file as a deployable ONNX file (onnxruntime)")
    x.add_argument("file", help="a .zbit file of a zoo model")
    x.add_argument("--format", default="onnx")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--mode", default="fast", choices=["fast", "exact"],
                   help="fast: integer kernels (a few more tensors quantized, calibrated on --data); exact: the "
                        ".zbit model's numbers only")
    x.add_argument("--no-int4", action="store_true", help="store ≤4-bit layers as int8 (faster in onnxruntime)")
    x.add_argument("--data", default="fashion-mnist", help="calibration and parity data ('' for none)")
    x.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs .zbit parity check")
    x.set_defaults(func=_cmd_export)
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zerobit", description="Joint pruning + quantization under a real budget.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a zoo model with its recipe and write its checkpoint + card")
    t.add_argument("--model", required=True)
    t.add_argument("--epochs", type=int, default=0, help="override the recipe's epochs")
    t.add_argument("--out", default=None, help="checkpoint folder (default: the zoo's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)
    c = _add_compress(sub)
    e = sub.add_parser("eval", help="test accuracy of a .zbit file")
    e.add_argument("file")
    e.add_argument("--data", default="fashion-mnist")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_eval)
    _add_export(sub)
    w = _add_sweep(sub)
    r = sub.add_parser("report", help="write DIR/report.html (Pareto fronts, per-layer maps, every number)")
    r.add_argument("folder", help="a sweep folder or a compress --out folder")
    r.add_argument("--run", default=None, help="the run whose per-layer choices are drawn (default: chosen)")
    r.add_argument("--out", default=None, help="the HTML file (default: FOLDER/report.html)")
    r.set_defaults(func=_cmd_report)
    d = sub.add_parser("demo", help="compress the pretrained ResNet-20 and print a before/after table")
    d.add_argument("--budget", default="1/32")
    d.add_argument("--strategy", default="sequential")
    d.add_argument("--finetune-epochs", type=float, default=0.5)
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=_cmd_demo)
    for command in (c, w):
        command.add_argument("--processes", type=int, default=1, help="fine-tune with DDP in this many local "
                             "processes (gloo on the CPU, nccl with one GPU each)")
    for command in (t, c, e, w, d):
        command.add_argument("--device", default="auto",
                             help="where to compute: auto (CUDA when available), cpu, cuda, cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad input, a damaged file (ZbitFormatError), a missing path
        print(f"zerobit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
