"""Command line: ``dncut train | tune | eval | eval-maps | eval-saliency | demo | report | backbones``.

Every command that takes ``--config`` also takes ``--set key.sub=value`` (repeatable; the
value is read as YAML) and validates the result before anything starts::

    dncut train --config configs/train/smoke.yaml --set train.max_steps=50 --set data.train=DIR
    dncut eval  --config configs/eval/smoke.yaml
    dncut eval-maps --masks DIR --maps DIR [DIR ...] --out DIR
    dncut eval-saliency --images DIR --masks DIR --backbone efficientnet_lite0 --method simple --out DIR
    dncut predict --images DIR --out DIR [--backbone NAME] [--checkpoint URI]   masks, maps, boxes
    dncut tune  --config configs/sweep/smoke.yaml
    dncut demo
    dncut report RUN         curves figure and last metrics of a training run folder
    dncut export RUN         the run's backbone as model.safetensors + config.json (timm's Hugging Face layout)
    dncut backbones          the registered backbones: stride, channels, normalisation, weights

Under ``ray job submit`` (``RAY_ADDRESS`` set) the commands join that cluster; otherwise
they start a local Ray in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from typing import Sequence

log = logging.getLogger("dncut")

DEMO_CONFIG = "train/demo"  # a bundled config (dncut.config.resolve_config)
CONFIG_KIND = {"train": "train", "demo": "train", "tune": "sweep", "eval": "eval", "eval-saliency": "eval",
               "predict": "eval", "found-train": "found"}
"""The bundled-config folder a command looks in first (``dncut train --config smoke`` = ``train/smoke``)."""


def _add_noise_args(p: argparse.ArgumentParser) -> None:
    """``-q`` / ``-v``, accepted before or after the command (``dncut -q train`` = ``dncut train -q``)."""
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars; only warnings, errors and the final result")
    noise.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging, and the Ray workers' own output on this console")


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    _add_noise_args(p)
    p.add_argument("--config", default=default, metavar="YAML",
                   help="config file (local or s3://) or the name of a bundled config, e.g. vits16_dino or "
                        f"train/smoke (dncut.config.resolve_config){f'; default {default}' if default else ''}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.alpha=0.1 (repeatable; value parsed as YAML)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    from dncut.backbone_specs import list_backbones
    from dncut.config import EvalMethod

    parser = argparse.ArgumentParser(prog="dncut", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print dncut's version and exit")
    _add_noise_args(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="self-supervised dense finetuning on Ray Train (resumes a run of the same name)")
    _add_config_args(p)
    p = sub.add_parser("found-train", help="FOUND's 1x1-conv head on the frozen model.backbone features of the "
                                           "data.train images, on Ray Train (resumes a run of the same name); "
                                           "writes <output_dir>/<run_name>/found_head.safetensors for eval.found_heads")
    _add_config_args(p)
    p = sub.add_parser("tune", help="Ray Tune sweep over loss.alpha x train.lr x model.backbone")
    _add_config_args(p)
    p.add_argument("--evaluate-best", action=argparse.BooleanOptionalAction, default=None,
                   help="run the eval section on the best trial's exported backbone (default: tune.evaluate_best)")
    p = sub.add_parser("eval", help="saliency / object-discovery evaluation as a Ray Data batch job")
    _add_config_args(p)

    p = sub.add_parser("eval-maps", help="score folders of precomputed saliency maps against masks")
    p.add_argument("--masks", required=True, help="folder of ground-truth masks (<stem>.png), local or s3://")
    p.add_argument("--maps", required=True, nargs="+",
                   help="folder(s) of maps (<stem>.png); a folder of method sub-folders also works")
    p.add_argument("--out", required=True, help="output folder for summary.json / summary.md")

    p = sub.add_parser("eval-saliency", help="unsupervised saliency of one backbone on an images/masks folder pair")
    p.add_argument("--images", required=True, help="folder of images, local or s3://")
    p.add_argument("--masks", required=True, help="folder of masks with the same stems")
    p.add_argument("--backbone", default=None, choices=list_backbones(), metavar="NAME",
                   help="backbone name (`dncut backbones` lists them); default: the config's model.backbone")
    p.add_argument("--checkpoint", default=None, help="backbone weights (local or s3://); default: pretrained")
    p.add_argument("--method", nargs="+", default=["simple"], choices=typing.get_args(EvalMethod),
                   help="simple: the paper's Simple NCut (z2 > 0, minority side = foreground); tokencut: "
                        "TokenCut (binary graph tau 0.2, seed + connected component); default simple")
    p.add_argument("--bilateral", action="store_true", help="also score the bilateral-solver refinement")
    p.add_argument("--out", required=True, help="output folder")
    _add_config_args(p)

    p = sub.add_parser("predict", help="masks, heat maps and boxes for a folder of unlabelled images (the eval "
                                       "job's pipeline; eval.methods, eval.image_size from the config)")
    p.add_argument("--images", required=True, help="folder or s3:// prefix of images")
    p.add_argument("--out", required=True, help="output folder: masks/<method>/, z2/<method>/, predictions.parquet")
    p.add_argument("--backbone", default=None, choices=list_backbones(), metavar="NAME",
                   help="backbone name (`dncut backbones`); default: the config's model.backbone")
    p.add_argument("--checkpoint", default=None, help="backbone weights (local or s3://); default: pretrained")
    _add_config_args(p)

    p = sub.add_parser("demo", help="the main job on the embedded default: finetune EfficientNet-Lite0 on generated "
                                    "scenes with a local Ray, saliency before/after, figure and weights under outputs/")
    _add_config_args(p, default=DEMO_CONFIG)
    p = sub.add_parser("report", help="curves figure (losses, pass fraction, template similarities, val IoU vs "
                                      "step) and last metrics of a training run folder")
    _add_noise_args(p)
    p.add_argument("run", metavar="RUN", help="a training run folder output_dir/run_name (local or s3://)")
    p.add_argument("--out", default=None, help="where to write the PNG (default RUN/curves.png)")
    p = sub.add_parser("export", help="a training run's backbone as safetensors in timm's Hugging Face layout "
                                      "(model.safetensors + config.json): loads with timm alone, or dncut.export.load_hf")
    _add_noise_args(p)
    p.add_argument("run", metavar="RUN", help="a training run folder output_dir/run_name holding backbone.pth and "
                                              "config.yaml (local or s3://)")
    p.add_argument("--format", default="hf", choices=["safetensors", "hf"],
                   help="safetensors: model.safetensors + config.json; hf: the same plus README.md (a model card), "
                        "i.e. a complete Hugging Face Hub repository folder; default hf")
    p.add_argument("--out", default=None, help="output folder, local or s3:// (default RUN/<format>)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="also upload to this Hugging Face Hub repo (user/name) with timm's push_to_hf_hub; needs "
                        "network access to the Hub and a write token (HF_TOKEN or `hf auth login`)")
    p = sub.add_parser("backbones", help="table of the registered backbones: stride, channels, input normalisation, "
                                     "tapped layer, BatchNorm, where the weights come from")
    _add_noise_args(p)
    return parser


def backbones_table() -> str:
    """Markdown table of ``dncut.backbone_specs`` (``dncut backbones``)."""
    from dncut.backbone_specs import SPECS

    fmt = lambda v: "(" + ", ".join(f"{x:.3f}" for x in v) + ")"  # noqa: E731
    lines = ["| name | stride | channels | tap | mean | std | BatchNorm | pretrained weights |",
             "|---|---|---|---|---|---|---|---|"]
    for name in sorted(SPECS):
        s = SPECS[name]
        lines.append(f"| {name} | {s.stride} | {s.channels} | {s.tap} | {fmt(s.mean)} | {fmt(s.std)} | "
                     f"{'yes' if s.batchnorm else 'no'} | {s.weights or 'none (model.checkpoint)'} |")
    return "\n".join(lines)


def load(args: argparse.Namespace):
    """The validated config of a command (exits with a readable message on errors)."""
    from dncut import storage
    from dncut.config import ConfigError, load_config, resolve_config

    try:
        return load_config(resolve_config(args.config, CONFIG_KIND.get(args.command)), args.overrides,
                           reader=storage.read_bytes)
    except (ConfigError, FileNotFoundError) as exc:
        raise SystemExit(f"dncut: config error: {exc}") from None


def run_report(run: str, out: str | None) -> int:
    """``dncut report RUN``: write the curves figure of ``RUN/metrics.jsonl`` and print the last report."""
    from dncut import storage
    from dncut.tracking import CURVES_FILE, HISTORY_FILE, plot_curves, read_history

    history = read_history(run)
    if not history:
        raise SystemExit(f"dncut: no {HISTORY_FILE} in {run} (not a training run folder, or no report yet)")
    out = out or storage.join(run, CURVES_FILE)
    storage.write_bytes(out, plot_curves(history))
    last = history[-1]
    print(f"{run}: {len(history)} reports, step {last['step']}/{last.get('total_steps', '?')}")
    for key in ("loss", "l_consistency", "l_reg", "pass_fraction", "val_iou", "val_max_fbeta", "val_step",
                "skipped_files", "nan_steps"):
        if key in last:
            print(f"  {key:14s} {last[key]}")
    print(f"curves: {out}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dncut")
    except PackageNotFoundError:
        return "unknown (not installed)"


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Join ``address`` / RAY_ADDRESS (ray job submit), or start a local Ray.

    The workers' output (dncut's worker log lines, Ray Data's and Ray Train's own) reaches this
    console only when ``verbose``; otherwise it stays in Ray's log files and the run's
    ``train.log``, and the driver draws the progress. A local Ray runs without Ray Train's
    preemption watcher (there is no spot instance to watch; it logs an error line at start).
    """
    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address=address, logging_level=logging.DEBUG if verbose else logging.ERROR, log_to_driver=verbose)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet, args.verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):  # their DEBUG lines print request headers (key ids)
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    if args.command == "eval-maps":
        from dncut.eval.batch import evaluate_maps
        from dncut.eval.report import format_table

        print(format_table(evaluate_maps(args.masks, args.maps, args.out)))
        return 0
    if args.command == "backbones":
        print(backbones_table())
        return 0
    if args.command == "report":
        return run_report(args.run, args.out)
    if args.command == "export":
        from dncut.train import export_run

        try:
            print("\n".join(export_run(args.run, args.format, args.out, push_to_hub=args.push_to_hub)))
        except (ValueError, RuntimeError, OSError) as exc:
            raise SystemExit(f"dncut export: {exc}") from None
        return 0
    cfg = load(args)
    from dncut.config import ConfigError
    from dncut.data.datasets import DatasetLayoutError
    from dncut.storage import StorageError

    try:
        return run_command(args, cfg)
    except (ConfigError, DatasetLayoutError, StorageError) as exc:  # bad input: the message, no traceback
        raise SystemExit(f"dncut {args.command}: {exc}") from None


def run_command(args: argparse.Namespace, cfg) -> int:
    """The Ray commands (``train``, ``found-train``, ``eval``, ...) on a loaded config."""
    if args.command == "train":
        from dncut.train import fit, run_dir

        init_ray(args.address, args.verbose)
        result = fit(cfg, progress=not args.quiet)
        print(json.dumps({"metrics": result.metrics, "checkpoint": str(result.checkpoint.path if result.checkpoint else None),
                          "run_dir": run_dir(cfg)}, indent=2, default=str))
        return 0
    if args.command == "found-train":
        from dncut import storage
        from dncut.found_train import HEAD_FILE, fit_found
        from dncut.train import run_dir

        init_ray(args.address, args.verbose)
        result = fit_found(cfg, progress=not args.quiet)
        print(json.dumps({"metrics": result.metrics, "head": storage.join(run_dir(cfg), HEAD_FILE)}, indent=2,
                         default=str))
        return 0
    if args.command == "eval":
        from dncut.eval.batch import run_evaluation
        from dncut.eval.report import format_table

        init_ray(args.address, args.verbose)
        print(format_table(run_evaluation(cfg)))
        return 0
    if args.command == "eval-saliency":
        from dncut.eval.batch import evaluate_saliency
        from dncut.eval.report import format_table

        init_ray(args.address, args.verbose)
        summary = evaluate_saliency(args.images, args.masks, args.backbone or cfg.model.backbone, args.checkpoint, args.method,
                                    args.bilateral, args.out, cfg)
        print(format_table(summary))
        return 0
    if args.command == "predict":
        from dncut.eval.infer import predict_folder

        init_ray(args.address, args.verbose)
        print(json.dumps(predict_folder(args.images, args.out, cfg, backbone=args.backbone,
                                        checkpoint=args.checkpoint), indent=2))
        return 0
    if args.command == "tune":
        from dncut.tune import run_sweep

        init_ray(args.address, args.verbose)
        run_sweep(cfg, evaluate=args.evaluate_best)
        return 0
    if args.command == "demo":
        from dncut.demo import run_demo

        init_ray(args.address, args.verbose)
        run_demo(cfg, progress=not args.quiet)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
