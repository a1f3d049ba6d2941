"""Command line: ``dncut train | tune | eval | eval-maps | eval-saliency | demo | backbones``.

Every command that takes ``--config`` also takes ``--set key.sub=value`` (repeatable; the
value is read as YAML) and validates the result before anything starts::

    dncut train --config configs/train/smoke.yaml --set train.max_steps=50 --set data.train=DIR
    dncut eval  --config configs/eval/smoke.yaml
    dncut eval-maps --masks DIR --maps DIR [DIR ...] --out DIR
    dncut eval-saliency --images DIR --masks DIR --backbone efficientnet_lite0 --method simple --out DIR
    dncut tune  --config configs/sweep/smoke.yaml
    dncut demo
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

DEMO_CONFIG = "configs/train/demo.yaml"


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, metavar="YAML",
                   help=f"config file (local or s3://){f'; default {default}' if default else ''}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.alpha=0.1 (repeatable; value parsed as YAML)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    from dncut.backbone_specs import list_backbones
    from dncut.config import EvalMethod

    parser = argparse.ArgumentParser(prog="dncut", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="self-supervised dense finetuning on Ray Train (resumes a run of the same name)")
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

    p = sub.add_parser("demo", help="the main job on the embedded default: finetune EfficientNet-Lite0 on generated "
                                    "scenes with a local Ray, saliency before/after, figure and weights under outputs/")
    _add_config_args(p, default=DEMO_CONFIG if os.path.exists(DEMO_CONFIG) else None)
    sub.add_parser("backbones", help="table of the registered backbones: stride, channels, input normalisation, "
                                     "tapped layer, BatchNorm, where the weights come from")
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
    from dncut.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides, reader=storage.read_bytes)
    except (ConfigError, FileNotFoundError) as exc:
        raise SystemExit(f"dncut: config error: {exc}") from None


def init_ray(address: str | None = None) -> None:
    """Join ``address`` / RAY_ADDRESS (ray job submit), or start a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "eval-maps":
        from dncut.eval.batch import evaluate_maps
        from dncut.eval.report import format_table

        print(format_table(evaluate_maps(args.masks, args.maps, args.out)))
        return 0
    if args.command == "backbones":
        print(backbones_table())
        return 0
    cfg = load(args)
    if args.command == "train":
        from dncut.train import fit, run_dir

        init_ray(args.address)
        result = fit(cfg)
        print(json.dumps({"metrics": result.metrics, "checkpoint": str(result.checkpoint.path if result.checkpoint else None),
                          "run_dir": run_dir(cfg)}, indent=2, default=str))
        return 0
    if args.command == "eval":
        from dncut.eval.batch import run_evaluation
        from dncut.eval.report import format_table

        init_ray(args.address)
        print(format_table(run_evaluation(cfg)))
        return 0
    if args.command == "eval-saliency":
        from dncut.eval.batch import evaluate_saliency
        from dncut.eval.report import format_table

        init_ray(args.address)
        summary = evaluate_saliency(args.images, args.masks, args.backbone or cfg.model.backbone, args.checkpoint, args.method,
                                    args.bilateral, args.out, cfg)
        print(format_table(summary))
        return 0
    if args.command == "tune":
        from dncut.tune import run_sweep

        init_ray(args.address)
        run_sweep(cfg, evaluate=args.evaluate_best)
        return 0
    if args.command == "demo":
        from dncut.demo import run_demo

        init_ray(args.address)
        run_demo(cfg)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
