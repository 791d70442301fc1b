"""``vlprompt predict``, ``vlprompt interpret`` and ``vlprompt merge``: use, inspect and deploy a learned prompt.

    vlprompt predict RUN IMAGE_OR_FOLDER... [--top-k 5] [--json] [--skip-bad]
    vlprompt predict --model ViT-B/16 --classes "cat,dog" IMAGE_OR_FOLDER...      (zero-shot on any class list)
    vlprompt interpret RUN [--top-k 5] [--json]
    vlprompt merge RUN --out FILE.safetensors [--overwrite]                        (CLIP-LoRA into a plain CLIP)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from vlprompt.common.vocab import DEFAULT_TEMPLATE, PRECISION_CHOICES
from vlprompt.harness.cli.common import add_output_options, console_logging, read_templates
from vlprompt.errors import ConfigError
from vlprompt.common.io import json_text
from vlprompt.harness.rundir import CONFIG_FILE, reading_lock
from vlprompt.methods.templates import TEMPLATE_SETS, template_set

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    """Register ``predict``, ``interpret`` and ``merge``."""
    _add_predict(subparsers)
    _add_interpret(subparsers)
    _add_merge(subparsers)


def _add_predict(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify images with a trained run, or zero-shot with any class list",
        usage="vlprompt predict [-h] [options] RUN IMAGE [IMAGE ...]\n"
              "       vlprompt predict [-h] [options] --model MODEL (--classes LIST | --classes-file FILE) "
              "IMAGE [IMAGE ...]",
        description="Print the top-k classes of each image with their probabilities. With a run folder first, its "
                    "learned prompt classifies the run's classes; with --classes / --classes-file, zero-shot CLIP "
                    "classifies any class list. IMAGE may be a file or a folder (its images, recursively).")
    parser.add_argument("inputs", nargs="+", metavar="RUN|IMAGE",
                        help="a run folder followed by images, or (with --classes) only images and folders")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip images that cannot be read (they are counted and listed on stderr) instead of "
                             "stopping with an error")
    parser.add_argument("--model", default=None,
                        help="backbone (name or checkpoint): required with --classes; with a run, it overrides the "
                             "recorded one and must be the same weights")
    classes = parser.add_argument_group("zero-shot on a class list")
    classes.add_argument("--classes", default=None, help="comma-separated class names, e.g. 'cat,dog,bird'")
    classes.add_argument("--classes-file", type=Path, default=None, help="a text file with one class name per line")
    classes.add_argument("--template", default=DEFAULT_TEMPLATE,
                         help=f"prompt template with one '{{}}' for the class name (default: {DEFAULT_TEMPLATE!r})")
    classes.add_argument("--ensemble", default=None, metavar="|".join([*TEMPLATE_SETS, "FILE"]),
                         help="prompt ensembling over a template set or a file of templates (instead of --template)")
    compute = parser.add_argument_group("compute options")
    compute.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the run's, else auto)")
    compute.add_argument("--precision", default=None, choices=list(PRECISION_CHOICES),
                         help="autocast precision: auto = bf16 where a one-time measurement on this machine finds it "
                              "faster (CUDA: where supported), else fp32; fp32 = exact (default: the run's, as "
                              "`eval`; auto for --classes). The precision used is printed on stderr and in --json")
    compute.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    add_output_options(parser)
    parser.set_defaults(func=run_predict)


def _add_interpret(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "interpret", help="nearest vocabulary words of a run's learned context vectors",
        description="Map each learned context vector of a CoOp / CoCoOp run to its nearest words in CLIP's token "
                    "embedding table (Euclidean distance), as in the CoOp paper's interpretation table.")
    parser.add_argument("run", type=Path, metavar="RUN", help="the run folder of a coop or cocoop run")
    parser.add_argument("--top-k", type=int, default=5, help="words shown per context vector (default: 5)")
    parser.add_argument("--model", default=None,
                        help="backbone instead of the recorded one (must be the same weights)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the run's)")
    add_output_options(parser)
    parser.set_defaults(func=run_interpret)


def _add_merge(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "merge", help="fold a CLIP-LoRA run's low-rank updates into a plain CLIP checkpoint",
        description="Write the backbone of a clip_lora run with its learned low-rank updates folded into the q/k/v "
                    "weights (W + s B A) as a plain CLIP checkpoint (a safetensors state dict with OpenAI names), "
                    "which --model and load_clip read like any CLIP: same features as the run's adapted model, no "
                    "extra cost at inference.")
    parser.add_argument("run", type=Path, metavar="RUN", help="the run folder of a clip_lora run")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.safetensors",
                        help="the checkpoint to write (atomically)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace FILE if an earlier vlprompt merge wrote it (any other file is never replaced)")
    parser.add_argument("--model", default=None,
                        help="backbone instead of the recorded one (must be the same weights)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the run's)")
    add_output_options(parser)
    parser.set_defaults(func=run_merge)


# ---------------------------------------------------------------------------------------------------------- predict


def run_predict(args: argparse.Namespace) -> int:
    """``vlprompt predict``."""
    from vlprompt.prediction.predictor import Predictor, parse_classnames, read_classes_file

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    with console_logging(args.quiet):
        zero_shot = args.classes is not None or args.classes_file is not None
        if zero_shot:
            if args.classes is not None and args.classes_file is not None:
                raise ConfigError("give the classes with --classes or --classes-file, not both")
            if args.model is None:
                raise ConfigError("zero-shot prediction on a class list needs the backbone: add --model (e.g. "
                                  "--model ViT-B/16)")
            names = parse_classnames(args.classes) if args.classes is not None else read_classes_file(
                args.classes_file)
            from vlprompt.stages import load_backbone, resolve_device

            templates = _ensemble_templates(args.ensemble) if args.ensemble else None
            clip = load_backbone(args.model, resolve_device(args.device))
            predictor = Predictor.zero_shot(clip, names, template=args.template, templates=templates,
                                            precision=args.precision or "auto", batch_size=args.batch_size)
            images = args.inputs
        else:
            run, images = Path(args.inputs[0]), args.inputs[1:]
            if not (run.is_dir() and (run / CONFIG_FILE).is_file()):
                raise ConfigError(f"{run} is not a run folder: give a trained run folder first, or classify zero-shot "
                                  "with --model and --classes / --classes-file")
            if not images:
                raise ConfigError(f"no images given after the run folder {run}: add image files or folders")
            from vlprompt.harness.pipeline import run_predictor

            predictor = run_predictor(run, model=args.model, device=args.device, precision=args.precision,
                                      batch_size=args.batch_size)
        logger.info("precision %s", predictor.precision)
        report = predictor.predict_report(images, args.top_k, skip_bad=args.skip_bad)
    if args.json:
        print(json_text({"classes": len(predictor.classnames), "precision": predictor.precision,
                         **report.to_dict()}))
    else:
        for prediction in report.predictions:
            print(prediction.source)
            width = max(len(label) for label in prediction.labels)
            for rank, (label, prob) in enumerate(zip(prediction.labels, prediction.probs), start=1):
                print(f"  {rank:>2}. {label:<{width}}  {100.0 * prob:6.2f}%")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable image(s):", file=sys.stderr)
        for source, reason in report.skipped:
            print(f"  {source}: {reason}", file=sys.stderr)
    return 0


def _ensemble_templates(value: str) -> tuple[str, ...]:
    if value in TEMPLATE_SETS:
        return template_set(value)
    return read_templates(Path(value))


# -------------------------------------------------------------------------------------------------------- interpret


def run_interpret(args: argparse.Namespace) -> int:
    """``vlprompt interpret``."""
    from vlprompt.prediction.interpret import context_vectors, format_neighbours, nearest_words
    from vlprompt.harness.pipeline import open_trained_run
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    with console_logging(args.quiet), reading_lock(args.run):
        trained = open_trained_run(args.run, model=args.model, device=args.device)
        ctx = context_vectors(trained.method)
        rows = nearest_words(ctx, trained.clip, k=args.top_k)
    method = trained.config.method
    if ctx.ndim == 3:  # class-specific context: one block per class
        blocks = list(zip(trained.method.classnames, rows, strict=True))
    else:
        blocks = [(None, rows)]
    if args.json:
        document = {"run": str(args.run), "method": method, "class_specific": ctx.ndim == 3,
                    "context_vectors": int(ctx.shape[-2]), "top_k": args.top_k,
                    "blocks": [{"class": name, "vectors": [
                        [{"word": n.word, "distance": n.distance, "token_id": n.token_id} for n in vector]
                        for vector in block]} for name, block in blocks]}
        print(json_text(document))
        return 0
    print(f"{method} context of {args.run}: {int(ctx.shape[-2])} vector(s), nearest words by Euclidean distance")
    for name, block in blocks:
        print(format_neighbours(block, title=f"class {name!r}" if name is not None else None))
    return 0


# ------------------------------------------------------------------------------------------------------------ merge


def run_merge(args: argparse.Namespace) -> int:
    """``vlprompt merge``."""
    from vlprompt.harness.pipeline import merge_run

    if not (args.run.is_dir() and (args.run / CONFIG_FILE).is_file()):
        raise ConfigError(f"{args.run} is not a run folder: give the folder of a trained clip_lora run")
    with console_logging(args.quiet):
        written = merge_run(args.run, args.out, overwrite=args.overwrite, model=args.model, device=args.device)
    from vlprompt.methods.clip_lora import read_merged_metadata

    metadata = read_merged_metadata(written)
    gelu = metadata.get("quick_gelu") == "false"
    if args.json:
        print(json_text({"run": str(args.run), "out": str(written), "base_backbone": metadata["base_backbone"],
                         "quick_gelu": not gelu}))
        return 0
    print(f"wrote {written}: {metadata['base_backbone'] or 'the backbone'} with the run's low-rank updates merged")
    print(f"use it as any CLIP: --model {written}" + (" (a GELU model: load_clip(..., quick_gelu=False))"
                                                     if gelu else ""))
    return 0
