"""Command line: one subcommand per task, built from :data:`COMMANDS`.

``dncut --help`` lists the subcommands from the parser itself, with one example each (``COMMANDS``);
``dncut COMMAND --help`` gives the command's description, options and example. Commands that take
``--config`` also take ``--set key.sub=value`` and validate the result before anything starts.
Under ``ray job submit`` (``RAY_ADDRESS`` set) the commands join that cluster; otherwise they start
a local Ray in-process.
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

DISCOVERY_METHODS = ("simple", "tokencut", "most")
"""``dncut eval-discovery``'s default methods: every NCut method that scores discovery (FOUND needs a head)."""
DEMO_CONFIG = "train/demo"  # a bundled config (dncut.config.resolve_config)
CONFIG_KIND = {"train": "train", "demo": "train", "tune": "sweep", "eval": "eval", "eval-saliency": "eval",
               "eval-discovery": "eval", "predict": "eval", "found-train": "found"}
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


DESCRIPTION = """dncut: Differentiable Normalized Cuts on Ray. Self-supervised dense finetuning of pretrained
backbones, and unsupervised saliency, object discovery and segmentation, with Ray Train, Tune and Data.

Every command that takes --config also takes --set key.sub=value (repeatable; the value is read as
YAML) and validates the resulting config before anything starts. Under `ray job submit`
(RAY_ADDRESS set) a command joins that cluster; otherwise it starts a local Ray in-process."""

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("Self-supervised dense finetuning of a backbone on Ray Train; rerunning a run_name resumes it.",
              "dncut train --config configs/train/smoke.yaml --set train.max_steps=50"),
    "found-train": ("FOUND's 1x1-conv head on frozen backbone features (Ray Train); writes "
                    "<output_dir>/<run_name>/found_head.safetensors for eval.found_heads.",
                    "dncut found-train --config found/bsds --set data.train=DIR"),
    "tune": ("Ray Tune sweep over loss.alpha x train.lr x model.backbone, then the eval section on the best trial.",
             "dncut tune --config configs/sweep/smoke.yaml"),
    "eval": ("Saliency, object discovery and segmentation of the config's datasets x methods x backbones "
             "(a Ray Data batch job).",
             "dncut eval --config configs/eval/smoke.yaml"),
    "eval-discovery": ("Object discovery (CorLoc) of one backbone on a COCO instances JSON or a VOC root, no YAML "
                       "needed.",
                       "dncut eval-discovery --images DIR --annotations instances.json --limit 100 --out outputs/disc"),
    "eval-maps": ("Score folders of precomputed saliency maps against ground-truth masks (no model; Ray Data tasks score them).",
                  "dncut eval-maps --masks GT_DIR --maps MAPS_DIR --out outputs/maps"),
    "eval-saliency": ("Unsupervised saliency of one backbone on an images/ + masks/ folder pair, no YAML needed.",
                      "dncut eval-saliency --images DIR/images --masks DIR/masks --backbone efficientnet_lite0 "
                      "--method simple tokencut --out outputs/sal"),
    "predict": ("Masks, z2 maps and boxes for a folder of unlabelled images (the eval job's pipeline).",
                "dncut predict --images DIR --out outputs/pred"),
    "demo": ("The main job on the embedded default: finetune EfficientNet-Lite0 on generated scenes with a local "
             "Ray, saliency before/after, figure and weights under outputs/demo/.",
             "dncut demo"),
    "report": ("Curves figure (losses, pass fraction, template similarities, val IoU vs step) and last metrics "
               "of a training run folder.",
               "dncut report outputs/demo"),
    "export": ("A training run's backbone as model.safetensors + config.json in timm's Hugging Face layout "
               "(hf adds a model card).",
               "dncut export outputs/demo --format hf"),
    "backbones": ("Table of the registered backbones: stride, channels, normalisation, tapped layer, BatchNorm, "
                  "weight source.",
                  "dncut backbones"),
}
"""Every subcommand, in the parser's order: (one-line description, one example). ``build_parser``
makes exactly these subcommands (it checks), and the README's command list is tested against them."""


def _command(sub, name: str) -> argparse.ArgumentParser:
    """The subparser ``name`` with its one-line description (the list's and the page's) and example."""
    description, example = COMMANDS[name]
    return sub.add_parser(name, help=description, description=description, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from dncut.backbone_specs import list_backbones
    from dncut.config import EvalConfig, EvalMethod

    parser = argparse.ArgumentParser(
        prog="dncut", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {example}" for _, example in COMMANDS.values())
               + "\n\n`dncut COMMAND --help` describes a command; the README has one section per task.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print dncut's version and exit")
    _add_noise_args(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "train")
    _add_config_args(p)
    p = _command(sub, "found-train")
    _add_config_args(p)
    p = _command(sub, "tune")
    _add_config_args(p)
    p.add_argument("--evaluate-best", action=argparse.BooleanOptionalAction, default=None,
                   help="run the eval section on the best trial's exported backbone (default: tune.evaluate_best)")
    p = _command(sub, "eval")
    _add_config_args(p)

    p = _command(sub, "eval-discovery")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of the images named in --annotations (COCO), local or s3://")
    source.add_argument("--voc", metavar="ROOT", help="a VOC root: VOCdevkit/VOC<year>/ or VOC<year>/ itself, "
                                                      "with JPEGImages/, Annotations/ and ImageSets/Main/")
    p.add_argument("--annotations", default=None, metavar="JSON",
                   help="COCO instances JSON of the --images (boxes; iscrowd regions dropped)")
    p.add_argument("--year", default="2007", choices=["2007", "2012"], help="VOC year of --voc; default 2007")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N images only; default all")
    p.add_argument("--backbone", default=None, choices=list_backbones(), metavar="NAME",
                   help="backbone name (`dncut backbones`); default: the config's model.backbone")
    p.add_argument("--checkpoint", default=None, help="backbone weights (local or s3://); default: pretrained")
    p.add_argument("--method", nargs="+", default=list(DISCOVERY_METHODS), choices=typing.get_args(EvalMethod),
                   metavar="METHOD", help=f"one or more of {', '.join(typing.get_args(EvalMethod))}; default "
                                          f"{' '.join(DISCOVERY_METHODS)} (every NCut method that scores discovery)")
    p.add_argument("--out", required=True, help="output folder (summary.json, summary.md, per_image.parquet)")
    _add_config_args(p)

    p = _command(sub, "eval-maps")
    p.add_argument("--masks", required=True, help="folder of ground-truth masks (<stem>.png), local or s3://")
    p.add_argument("--maps", required=True, nargs="+",
                   help="folder(s) of maps (<stem>.png); a folder of method sub-folders also works")
    p.add_argument("--out", required=True, help="output folder for summary.json / summary.md")

    p = _command(sub, "eval-saliency")
    p.add_argument("--images", required=True, help="folder of images, local or s3://")
    p.add_argument("--masks", required=True, help="folder of masks with the same stems")
    p.add_argument("--backbone", default=None, choices=list_backbones(), metavar="NAME",
                   help="backbone name (`dncut backbones` lists them); default: the config's model.backbone")
    p.add_argument("--checkpoint", default=None, help="backbone weights (local or s3://); default: pretrained")
    p.add_argument("--method", nargs="+", default=["simple"], choices=typing.get_args(EvalMethod), metavar="METHOD",
                   help=f"one or more of {', '.join(typing.get_args(EvalMethod))}: "
                        f"{EvalConfig.model_fields['methods'].description}; default simple")
    p.add_argument("--bilateral", action="store_true", help="also score the bilateral-solver refinement")
    p.add_argument("--out", required=True, help="output folder")
    _add_config_args(p)

    p = _command(sub, "predict")
    p.add_argument("--images", required=True, help="folder or s3:// prefix of images")
    p.add_argument("--out", required=True, help="output folder: masks/<method>/, z2/<method>/, predictions.parquet")
    p.add_argument("--backbone", default=None, choices=list_backbones(), metavar="NAME",
                   help="backbone name (`dncut backbones`); default: the config's model.backbone")
    p.add_argument("--checkpoint", default=None, help="backbone weights (local or s3://); default: pretrained")
    _add_config_args(p)

    p = _command(sub, "demo")
    _add_config_args(p, default=DEMO_CONFIG)
    p = _command(sub, "report")
    _add_noise_args(p)
    p.add_argument("run", metavar="RUN", help="a training run folder output_dir/run_name (local or s3://)")
    p.add_argument("--out", default=None, help="where to write the PNG (default RUN/curves.png)")
    p = _command(sub, "export")
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
    p = _command(sub, "backbones")
    _add_noise_args(p)
    if list(sub.choices) != list(COMMANDS):  # COMMANDS is the parser's own list, in its order
        raise AssertionError(f"dncut.cli.COMMANDS {list(COMMANDS)} != the parser's {list(sub.choices)}")
    return parser


def backbones_table() -> str:
    """Markdown table of ``dncut.backbone_specs`` (``dncut backbones``)."""
    from dncut.backbone_specs import SPECS

    fmt = lambda v: "(" + ", ".join(f"{x:.3f}" for x in v) + ")"  # noqa: E731
    lines = ["| name | stride | channels | tap | mean | std | BatchNorm | notes | pretrained weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(SPECS):
        s = SPECS[name]
        lines.append(f"| {name} | {s.stride} | {s.channels} | {s.tap} | {fmt(s.mean)} | {fmt(s.std)} | "
                     f"{'yes' if s.batchnorm else 'no'} | {s.note} | {s.weights or 'none (model.checkpoint)'} |")
    return "\n".join(lines)


def load(args: argparse.Namespace):
    """The validated config of a command (exits with a readable message on errors)."""
    from dncut import storage
    from dncut.config import ConfigError, load_config, resolve_config

    try:
        return load_config(resolve_config(args.config, CONFIG_KIND.get(args.command)), args.overrides,
                           reader=storage.read_bytes)
    except ConfigError as exc:
        problems = list(exc.problems) or [str(exc)]
        if len(problems) == 1 and exc.source:  # one mistake: one line, the key first, then where
            problems = [f"{problems[0]} (invalid config {exc.source})"]
        print(f"dncut {args.command}: config error: " + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(2) from None
    except FileNotFoundError as exc:
        print(f"dncut {args.command}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


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


PROGRESS_EVERY_S = 30
"""Without a terminal (CI logs, ``ray job logs``): one progress line at most this often."""
LOG_FILE = "dncut.log"
"""The driver's log (dncut's lines and Ray Data's own) under an evaluation's output folder."""


class _CompactProgress(logging.Filter):
    """Ray Data's non-terminal progress block (a banner, totals, one line per operator) -> one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Total Progress"):
            return False
        record.msg, record.args = f"progress: {message.split(':', 1)[1].strip()} rows", None
        return True


def setup_console(quiet: bool, verbose: bool) -> None:
    """What reaches this console: ``-q`` the result (and warnings, errors); default dncut's INFO
    lines and progress (bars on a terminal, else one compact line every ``PROGRESS_EVERY_S``);
    ``-v`` everything, Ray's own lines included. Ray Data's own INFO lines go to its log file
    (and the output folder's ``dncut.log``: ``log_to_folder``)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("dncut").setLevel(level)
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):  # their DEBUG lines print request headers (key ids)
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    tty = sys.stdout.isatty()
    if not tty:
        os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(PROGRESS_EVERY_S))
    import ray.data  # Ray Data reads the variable above when it loads its progress module

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    if verbose:
        return
    # "Progress bars disabled" / "Progress will be logged": the choice made here, not news
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR if quiet else logging.WARNING)
    progress = logging.getLogger("ray.data._internal.progress.logging_progress")  # Ray Data's progress lines
    progress.setLevel(logging.INFO)
    if not any(isinstance(f, _CompactProgress) for f in progress.filters):
        progress.addFilter(_CompactProgress())
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        progress.addHandler(console)
        progress.propagate = False  # not through Ray Data's console handler, which shows warnings only
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data's console: warnings only
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


def log_to_folder(folder: str) -> None:
    """Append the driver's dncut lines and Ray Data's own (INFO and up) to ``folder/dncut.log``
    (local folders; on S3 Ray Data's lines stay in Ray's session log folder)."""
    from dncut.storage import Storage

    if Storage.is_s3(folder):
        return
    os.makedirs(folder, exist_ok=True)
    close_folder_log()
    handler = logging.FileHandler(os.path.join(folder, LOG_FILE))
    handler.dncut_folder_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in ("dncut", "ray.data"):
        logging.getLogger(name).addHandler(handler)


def close_folder_log() -> None:
    """Detach and close the file of ``log_to_folder`` (at the end of a command run in-process)."""
    for name in ("dncut", "ray.data"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, "dncut_folder_log", False)]:
            logger.removeHandler(handler)
            handler.close()


def precheck(args: argparse.Namespace, cfg=None) -> None:
    """Every input of the command, checked before Ray starts (``dncut.checks``).

    Raises:
        dncut.checks.InputError: the first mistake found, naming the input and the fix.
    """
    from dncut import checks
    from dncut.storage import Storage

    store = cfg.storage_handle() if cfg is not None else Storage()
    command = args.command
    if command in ("export", "report"):
        from dncut.tracking import HISTORY_FILE

        checks.check_run_folder(args.run, store, ["config.yaml", "backbone.pth"] if command == "export"
                                else [HISTORY_FILE])
        if args.out:
            checks.check_output(args.out, "--out")
        return
    if command == "eval-maps":
        checks.check_folder(args.masks, "--masks", store, "a folder of <stem>.png ground-truth masks",
                            checks.MASK_SUFFIXES)
        for folder in args.maps:
            checks.check_folder(folder, "--maps", store, "a folder of <stem>.png maps, or a folder of such folders",
                                checks.MASK_SUFFIXES)
        checks.check_output(args.out, "--out")
        return
    if command in ("train", "demo", "found-train"):
        checks.check_training(cfg, store)
        return
    if command == "tune":
        checks.check_training(cfg, store)
        if args.evaluate_best or (args.evaluate_best is None and cfg.tune.evaluate_best):
            checks.check_eval_datasets(cfg, store)
        return
    if command == "eval":
        checks.check_evaluation(cfg, store)
        return
    backbone = args.backbone or cfg.model.backbone
    checks.check_output(args.out, "--out")
    if command == "eval-saliency":
        image_files = checks.check_folder(args.images, "--images", store, "a folder of <stem>.jpg|png images")
        mask_files = checks.check_folder(args.masks, "--masks", store,
                                         "a folder of <stem>.png masks with the images' stems", checks.MASK_SUFFIXES)
        checks.check_saliency_pairs(args.images, image_files, args.masks, mask_files)
    elif command == "predict":
        checks.check_folder(args.images, "--images", store, "a folder (or s3:// prefix) of images")
        checks.check_no_earlier_prediction(args.out, "--out", store)
    elif command == "eval-discovery":
        if args.images is not None and not args.annotations:
            raise checks.InputError("--images needs --annotations: the COCO instances JSON of those images "
                                    "(or give a VOC root with --voc)")
        if args.annotations:
            checks.check_file(args.annotations, "--annotations", store, "give a COCO instances JSON")
        if args.limit is not None and args.limit < 1:
            raise checks.InputError(f"--limit {args.limit}: give a positive number of images")
    checks.check_checkpoint(args.checkpoint, "--checkpoint", store)
    checks.check_weights(backbone, cfg.model.pretrained, args.checkpoint, "--backbone")
    if command == "eval-discovery":
        checks.check_evaluation(cfg, store, f"--voc {args.voc}" if args.voc else f"--images {args.images}")
    elif "found" in cfg.eval.methods or command == "eval-saliency" and "found" in args.method:
        checks.check_found_heads(cfg, [backbone], [args.checkpoint], store)


def discovery_config(args: argparse.Namespace, cfg):
    """The config ``dncut eval-discovery`` runs: one discovery set built from the options."""
    from dncut.eval.inputs import dataset_name

    if args.voc is not None:
        dataset = {"name": f"VOC{args.year}", "kind": "voc07" if args.year == "2007" else "voc12", "root": args.voc}
    else:
        dataset = {"name": dataset_name(args.images), "kind": "coco", "root": args.images,
                   "annotations": args.annotations}
    if args.limit is not None:
        dataset["limit"] = args.limit
    out = args.out.rstrip("/")
    parent, _, name = out.rpartition("/")
    return cfg.with_overrides({"eval.datasets": [dataset], "eval.methods": list(dict.fromkeys(args.method)),
                               "eval.backbones": [args.backbone or cfg.model.backbone],
                               "eval.checkpoints": [args.checkpoint], "eval.image_size": None,
                               "output_dir": parent or ".", "run_name": name})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet, args.verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    from dncut.checks import InputError
    from dncut.config import ConfigError
    from dncut.data.datasets import DatasetLayoutError
    from dncut.storage import StorageError

    if args.command == "backbones":
        print(backbones_table())
        return 0
    setup_console(args.quiet, args.verbose)
    cfg = load(args) if args.command in CONFIG_KIND else None
    try:
        if args.command == "eval-discovery":
            cfg = discovery_config(args, cfg)
        precheck(args, cfg)
    except (InputError, ConfigError) as exc:  # a user's mistake: one line, exit code 2, Ray never started
        print(f"dncut {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        if args.command == "eval-maps":
            from dncut.eval.jobs import evaluate_maps
            from dncut.eval.report import format_table

            log_to_folder(args.out)
            print(format_table(evaluate_maps(args.masks, args.maps, args.out)))
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
        return run_command(args, cfg)
    except (ConfigError, DatasetLayoutError, StorageError, InputError) as exc:  # bad input: the message, no traceback
        print(f"dncut {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        close_folder_log()


def run_command(args: argparse.Namespace, cfg) -> int:
    """The Ray commands (``train``, ``found-train``, ``eval``, ...) on a loaded config."""
    if args.command == "train":
        from dncut.train import fit

        init_ray(args.address, args.verbose)
        result = fit(cfg, progress=not args.quiet)
        print(json.dumps({"metrics": result.metrics, "checkpoint": str(result.checkpoint.path if result.checkpoint else None),
                          "run_dir": cfg.run_dir}, indent=2, default=str))
        return 0
    if args.command == "found-train":
        from dncut import storage
        from dncut.train.found import HEAD_FILE, fit_found

        init_ray(args.address, args.verbose)
        result = fit_found(cfg, progress=not args.quiet)
        print(json.dumps({"metrics": result.metrics, "head": storage.join(cfg.run_dir, HEAD_FILE)}, indent=2,
                         default=str))
        return 0
    if args.command == "eval":
        from dncut.eval.jobs import run_evaluation
        from dncut.eval.report import format_table

        init_ray(args.address, args.verbose)
        log_to_folder(cfg.run_dir)
        print(format_table(run_evaluation(cfg)))
        return 0
    if args.command == "eval-discovery":
        from dncut.eval.jobs import run_evaluation
        from dncut.eval.report import format_table

        init_ray(args.address, args.verbose)
        log_to_folder(cfg.run_dir)
        print(format_table(run_evaluation(cfg)))
        return 0
    if args.command == "eval-saliency":
        from dncut.eval.jobs import evaluate_saliency
        from dncut.eval.report import format_table

        init_ray(args.address, args.verbose)
        log_to_folder(args.out)
        summary = evaluate_saliency(args.images, args.masks, args.backbone or cfg.model.backbone, args.checkpoint, args.method,
                                    args.bilateral, args.out, cfg)
        print(format_table(summary))
        return 0
    if args.command == "predict":
        from dncut.eval.jobs import predict_folder

        init_ray(args.address, args.verbose)
        log_to_folder(args.out)
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
