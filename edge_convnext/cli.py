"""``edge-convnext`` (or ``python -m edge_convnext``): thin subcommands over typed library functions.

Converter commands import torch lazily, inside their handlers; ``info``, ``recipes``, ``eval`` and
``classify`` run on a light install (NumPy, Pillow, one runtime).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from edge_convnext import __version__
from edge_convnext.errors import EdgeConvNextError

DEFAULT_OUT = Path("artifacts")
DEFAULT_GATE = Path(__file__).parent / "gates" / "default.json"
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "coremltools", "root.coremltools", "absl", "jax", "executorch")


def _cmd_info(args: argparse.Namespace) -> int:
    from edge_convnext.info import report

    print(report())
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from edge_convnext.recipes import RECIPES

    if args.json:
        print(json.dumps([{"name": r.name, "format": r.format.key, "precision": r.precision,
                           "calibrated": r.calibrated, "description": r.description} for r in RECIPES], indent=2))
        return 0
    width = max(len(r.name) for r in RECIPES)
    for r in RECIPES:
        print(f"{r.name:<{width}}  {r.description}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from edge_convnext.recipes import select_recipes

    select_recipes(args.recipes)  # an unknown name fails now, before torch loads
    from converters.build import ConvertOptions, convert
    from edge_convnext.preprocessing import Preprocessing

    pre = Preprocessing.from_hf_config_file(args.preprocessor_config) if args.preprocessor_config else None
    target = None
    if args.min_sqnr is not None or args.min_agreement is not None:
        from converters.accuracy_target import AccuracyTarget

        confidence = {} if args.target_confidence is None else {"confidence": args.target_confidence}
        try:
            target = AccuracyTarget(args.min_sqnr, args.min_agreement, **confidence)
        except ValueError as e:  # a bad number on the command line: say which, no traceback
            raise EdgeConvNextError(str(e)) from None
    opts = ConvertOptions(
        weights=args.weights, recipes=args.recipes, out=args.out, data=args.data,
        calibration_images=args.calibration_images, calibration=args.calibration, parity_images=args.parity_images,
        reference_images=args.reference_images, preprocessing=pre, threads=args.threads, fail_fast=args.fail_fast,
        target=target,
    )
    report = convert(opts)
    from edge_convnext.report import convert_summary

    print(convert_summary(report.outcomes, report.weights))
    for w in report.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    return 0 if report.ok else 1


def _cmd_reference(args: argparse.Namespace) -> int:
    from converters.reference import ensure_reference
    from converters.weights import load_weights
    from edge_convnext.dataset import load_subset

    weights = load_weights(args.weights)
    ref = ensure_reference(weights, load_subset(args.data, args.ground_truth), args.out, args.limit, ray=args.ray,
                           threads=args.threads, shard_images=args.shard_images, ray_cpus=args.ray_cpus)
    print(f"{args.out}/reference.npz: {len(ref.image_ids)} images, weights {weights.identity.source}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from edge_convnext.evaluate import EvalOptions, evaluate_paths
    from edge_convnext.gate import check_gate, load_gate
    from edge_convnext.report import write_reports

    opts = EvalOptions(data=args.data, ground_truth=args.ground_truth, reference=args.reference, limit=args.limit,
                       threads=args.threads, verify=not args.no_verify, budget_s=args.budget, results=args.results,
                       ray=args.ray, shard_images=args.shard_images, ray_cpus=args.ray_cpus,
                       decode_threads=args.decode_threads)
    run = evaluate_paths(args.paths, opts)
    if args.results or args.ray is not None:
        n = run.shards
        print(f"shards: {n.get('computed', 0)} computed, {n.get('reused', 0)} reused from --results, "
              f"{n.get('failed', 0)} failed, {n.get('corrupted', 0)} corrupted files recomputed", file=sys.stderr)
    gate_result = None
    if args.gate is not None:
        gate_file = DEFAULT_GATE if args.gate == "default" else Path(args.gate)
        gate_result = check_gate(run, load_gate(gate_file), baseline=args.baseline,
                                 other_weights=args.gate_other_weights)
    text = write_reports(run, gate_result, json_path=args.json, junit_path=args.junit,
                         markdown_path=args.markdown, plot_path=args.plot, baseline_out=args.write_baseline)
    print(text)
    if run.errors:
        return 1
    return 0 if gate_result is None or gate_result.passed else 2


def _cmd_gate_init(args: argparse.Namespace) -> int:
    from edge_convnext.fileio import write_json_atomic
    from edge_convnext.gate import gate_from_report

    try:
        report = json.loads(Path(args.report).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeConvNextError(f"{args.report}: cannot read an eval JSON report ({e}); write one with eval --json") from e
    gate = gate_from_report(report, min_images=args.min_images, budget_s=args.budget)
    write_json_atomic(args.out, gate)
    print(f"{args.out}: thresholds for {len(gate['recipes'])} recipes ({gate['policy']})")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from edge_convnext.classify import classify

    results = classify(args.artifact, args.images, top=args.top, threads=args.threads, verify=not args.no_verify)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            print(r.text())
    return 0 if all(r.error is None for r in results) else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from edge_convnext.bench import BenchOptions, bench, plot, profiles, ratios, table
    from edge_convnext.fileio import write_json_atomic, write_text_atomic

    opts = BenchOptions(runs=args.runs, warmup=args.warmup, threads=args.threads, fidelity_images=args.fidelity_images,
                        data=args.data, peers=args.peers, weights=args.weights, profile=args.profile)
    rows = bench(args.paths, opts, echo=lambda s: print(s, file=sys.stderr))
    text = table(rows, args.threads)
    if args.profile:
        text += "\n\n" + profiles(rows)
    print(text)
    if args.json:
        write_json_atomic(args.json, {"threads": args.threads, "runs": args.runs,
                                      "rows": [r.to_dict() | {"ratio": x} for r, x in zip(rows, ratios(rows))]})
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")
    if args.plot:
        plot(rows, args.plot, f"threads: {args.threads or 'runtime default'}, median of {args.runs} runs, each row in its own process")
    failed = [r for r in rows if r.status.startswith("error") or (r.profile or {}).get("status", "").startswith("error")]
    return 1 if failed else 0


def _cmd_app_eval(args: argparse.Namespace) -> int:
    from edge_convnext.app_eval import evaluate_apps, table
    from edge_convnext.fileio import write_json_atomic, write_text_atomic

    run = evaluate_apps(args.paths, data=args.data, limit=args.limit, verify=not args.no_verify)
    text = table(run)
    print(text)
    if args.json:
        write_json_atomic(args.json, {"synthetic": run.synthetic, "reference": run.reference,
                                      "results": [r.to_dict() for r in run.results]})
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")
    return 1 if any(r.error for r in run.results) else 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from edge_convnext.fileio import write_json_atomic, write_text_atomic
    from edge_convnext.manifest import manifest_path, read_manifest
    from edge_convnext.recipes import FLOAT_PRECISIONS

    m = read_manifest(manifest_path(args.artifact))
    if m.precision in FLOAT_PRECISIONS:  # answered without the build stack
        text = f"{args.artifact}: {m.recipe} is a float recipe ({m.precision}); nothing in it is quantized"
        print(text)
        if args.json:
            write_json_atomic(args.json, {"schema": "edge-convnext/layers/v1", "artifact": str(args.artifact),
                                          "recipe": m.recipe, "precision": m.precision, "layers": [], "note": text})
        return 0
    try:
        from converters.layer_report import layer_report, plot
    except ImportError as e:
        from edge_convnext.errors import MissingExtra

        raise MissingExtra(e.name or "torch", "convert", "`edge-convnext layers` (it rebuilds the float model from "
                           "the manifest's weights with torch)") from e
    report = layer_report(args.artifact, images=args.images, data=args.data, threads=args.threads,
                          verify=not args.no_verify, echo=lambda s: print(s, file=sys.stderr))
    print(report.text(all_layers=args.all_layers))
    if args.json:
        write_json_atomic(args.json, report.to_dict())
    if args.markdown:
        write_text_atomic(args.markdown, report.markdown())
    if args.plot:
        plot(report, args.plot)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from edge_convnext.runners.executorch_coreml import extract

    out = extract(args.artifact, args.out)
    print(f"{out}: the Core ML model inside {args.artifact}'s CoreMLBackend delegate (float32 NCHW input, "
          "logits output; the program's softmax is outside the delegate)")
    return 0


def _cmd_roi(args: argparse.Namespace) -> int:
    from edge_convnext.preprocessing import CONVNEXT_HF, Preprocessing
    from edge_convnext.roi import center_crop_roi, photo_roi

    pre = CONVNEXT_HF
    if args.manifest:
        from edge_convnext.manifest import read_manifest

        pre = Preprocessing.from_dict(read_manifest(args.manifest).preprocessing)
    if "x" in args.photo and not Path(args.photo).exists():
        try:
            w, h = (int(v) for v in args.photo.lower().split("x"))
        except ValueError:
            raise EdgeConvNextError(f"{args.photo}: give a photo file or its size as WIDTHxHEIGHT, e.g. 4032x3024") from None
        roi = center_crop_roi(w, h, pre)
    else:
        roi, (w, h) = photo_roi(Path(args.photo), pre)
    x, y, rw, rh = roi.vision()
    out = {"photo": args.photo, "size": [w, h], "mediapipe_rectf": roi.to_dict(),
           "vision_region_of_interest": {"x": x, "y": y, "width": rw, "height": rh},
           "pixels": list(roi.pixels(w, h))}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.photo}: {w}x{h} (after EXIF orientation)\n"
              f"  MediaPipe: RectF(left={roi.left:.6f}, top={roi.top:.6f}, right={roi.right:.6f}, bottom={roi.bottom:.6f})\n"
              f"  Vision:    regionOfInterest = CGRect(x: {x:.6f}, y: {y:.6f}, width: {rw:.6f}, height: {rh:.6f})\n"
              f"  pixels:    left {out['pixels'][0]:.1f}, top {out['pixels'][1]:.1f}, right {out['pixels'][2]:.1f}, "
              f"bottom {out['pixels'][3]:.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-convnext", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edge-convnext {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("info", help="versions, and which runtimes and converters are usable here").set_defaults(
        func=_cmd_info)

    s = sub.add_parser("recipes", help="list the recipes convert can build")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_recipes)

    data_help = "ImageNet val data directory (default: ../shared/data beside the repo, or $EDGE_CONVNEXT_DATA)"
    s = sub.add_parser("convert", help="build artifacts with manifests, labels, reference logits and parity checks")
    s.add_argument("--weights", help="HF hub id or directory, checkpoint file (.safetensors/.pth), or random[:SEED]; "
                   "default facebook/convnext-tiny-224, falling back to random:0 (loudly) when unavailable")
    s.add_argument("--recipes", default="all", help="all, a format (coreml, tflite, executorch) or NAME,NAME")
    s.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: artifacts)")
    s.add_argument("--data", type=Path, help=data_help)
    s.add_argument("--calibration-images", type=int, default=128, metavar="N",
                   help="calibration-split images for quantized recipes (default 128)")
    s.add_argument("--calibration", type=Path, metavar="DIR",
                   help="calibrate on your own images (every image under DIR) instead of the data's calibration split")
    s.add_argument("--parity-images", type=int, default=8, metavar="N",
                   help="evaluation images for the build-time parity check (default 8)")
    s.add_argument("--reference-images", type=int, metavar="N",
                   help="store reference logits for the first N evaluation images (default: all)")
    s.add_argument("--preprocessor-config", type=Path, metavar="FILE",
                   help="an HF preprocessor_config.json overriding the weights' preprocessing")
    s.add_argument("--threads", type=int, help="CPU threads for torch and the runtimes")
    s.add_argument("--fail-fast", action="store_true", help="stop at the first failing recipe")
    s.add_argument("--min-sqnr", type=float, metavar="DB",
                   help="accuracy target for quantized recipes: keep the fewest, most sensitive layers float until the "
                        "artifact reaches this SQNR on held-out calibration images")
    s.add_argument("--min-agreement", type=float, metavar="FRACTION",
                   help="accuracy target: top-1 agreement with the float model on held-out calibration images (0-1)")
    s.add_argument("--target-confidence", type=float, metavar="P",
                   help="the accuracy target is met when the lower P bootstrap bound of the held-out measurement "
                        "reaches it (default 0.9; 0.5 judges the held-out number itself)")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("reference", help="compute and store the float reference logits of the evaluation split")
    s.add_argument("--weights")
    s.add_argument("--out", type=Path, default=DEFAULT_OUT)
    s.add_argument("--data", type=Path, help=data_help)
    s.add_argument("--ground-truth", type=Path, help="'<file> <label>' ground truth for a user image directory")
    s.add_argument("--limit", type=int, metavar="N", help="only the first N evaluation images")
    s.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="compute shards as Ray tasks on the "
                   "cluster at ADDRESS (or a local one); workers need the [convert] and [ray] extras and the weights")
    s.add_argument("--threads", type=int, help="torch threads per Ray task (default 1)")
    s.add_argument("--shard-images", type=int, default=256, metavar="N", help="images per shard with --ray")
    s.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs of the local Ray cluster (default: all cores)")
    s.set_defaults(func=_cmd_reference)

    s = sub.add_parser("eval", help="accuracy and fidelity of artifacts on the evaluation split, with an optional gate")
    s.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="artifacts or artifact directories")
    s.add_argument("--data", type=Path, help=data_help)
    s.add_argument("--ground-truth", type=Path, help="'<file> <label>' ground truth for a user image directory")
    s.add_argument("--reference", type=Path, help="stored reference logits (default: reference.npz beside the artifacts)")
    s.add_argument("--limit", type=int, metavar="N", help="only the first N evaluation images")
    s.add_argument("--threads", type=int, help="runtime CPU threads (default: all cores)")
    s.add_argument("--budget", type=float, metavar="SECONDS",
                   help="per artifact: stop after this long and report the images done (slow runtimes, devices)")
    s.add_argument("--decode-threads", type=int, default=1, metavar="N",
                   help="threads decoding and preprocessing the next images while the artifact runs (default 1; "
                        "0 decodes in between inferences). Same results either way")
    s.add_argument("--gate", nargs="?", const="default", metavar="FILE",
                   help="fail (exit 2) when an artifact misses its thresholds (default: the packaged gate file)")
    s.add_argument("--gate-other-weights", action="store_true",
                   help="check a gate that was measured on other weights than the artifacts' (refused by default)")
    s.add_argument("--baseline", type=Path, metavar="FILE", help="last accepted numbers; regressions beyond the "
                   "gate's tolerance fail")
    s.add_argument("--write-baseline", type=Path, metavar="FILE", help="write this run's numbers as a baseline")
    s.add_argument("--json", type=Path, metavar="FILE")
    s.add_argument("--junit", type=Path, metavar="FILE")
    s.add_argument("--markdown", type=Path, metavar="FILE")
    s.add_argument("--plot", type=Path, metavar="FILE", help="PNG: agreement and accuracy against size")
    s.add_argument("--no-verify", action="store_true", help="run artifacts whose sha256 does not match the manifest")
    s.add_argument("--results", type=Path, metavar="DIR", help="keep finished shards here; a rerun with the same "
                   "DIR computes only what is missing (keyed by artifact sha256, images, preprocessing, runtime "
                   "version, threads and CPU)")
    s.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="run shards as Ray tasks on the "
                   "cluster at ADDRESS (or start a local one when no address is given); needs the [ray] extra. "
                   "--threads defaults to 1 per task; --budget is refused")
    s.add_argument("--shard-images", type=int, default=256, metavar="N", help="images per shard with --ray "
                   "(default 256)")
    s.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs of the local Ray cluster (default: all cores)")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("gate-init", help="write a gate file from a measured eval --json report")
    s.add_argument("report", type=Path, help="the JSON written by eval --json")
    s.add_argument("--out", type=Path, required=True, help="gate file to write")
    s.add_argument("--min-images", type=int, default=100)
    s.add_argument("--budget", type=float, default=120.0, help="the --budget CI evaluates with (seconds)")
    s.set_defaults(func=_cmd_gate_init)

    s = sub.add_parser("bench", help="latency, load time, peak memory and fidelity per artifact, each in its own "
                       "process; --peers adds ONNX Runtime and PyTorch eager on the same weights")
    s.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="artifacts or artifact directories")
    s.add_argument("--runs", type=int, default=20)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--threads", type=int)
    s.add_argument("--peers", action="store_true", help="also ONNX Runtime fp32 and PyTorch eager (the [bench] and "
                   "[convert] extras); ratios are then to ONNX Runtime fp32")
    s.add_argument("--weights", help="the peers' weights (default: the reference's recorded source; its sha256 must match)")
    s.add_argument("--profile", action="store_true", help="also where the time goes, per op kind, layer and op: "
                   ".tflite cut into one model per op (light install), .pte from ExecuTorch's ETDump; Core ML "
                   "is not profiled (emulated here)")
    s.add_argument("--fidelity-images", type=int, default=32, metavar="N",
                   help="evaluation images for the fidelity columns (default 32)")
    s.add_argument("--data", type=Path, help=data_help)
    s.add_argument("--json", type=Path, metavar="FILE")
    s.add_argument("--markdown", type=Path, metavar="FILE")
    s.add_argument("--plot", type=Path, metavar="FILE", help="PNG: agreement against latency")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("app-eval", help="top-1 agreement through the apps' own pipelines: MediaPipe's ImageClassifier "
                       "for .tflite, emulated Vision crop-and-scale for .mlpackage")
    s.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="artifacts or artifact directories")
    s.add_argument("--data", type=Path, help=data_help)
    s.add_argument("--limit", type=int, metavar="N", help="only the first N evaluation images")
    s.add_argument("--json", type=Path, metavar="FILE")
    s.add_argument("--markdown", type=Path, metavar="FILE")
    s.add_argument("--no-verify", action="store_true", help="run artifacts whose sha256 does not match the manifest")
    s.set_defaults(func=_cmd_app_eval)

    s = sub.add_parser("roi", help="the region of interest that makes MediaPipe or Vision crop a photo like the "
                       "shared preprocessing (resize shortest edge 256, center 224)")
    s.add_argument("photo", help="an image file (its EXIF orientation applied) or its size WIDTHxHEIGHT")
    s.add_argument("--manifest", type=Path, help="take the preprocessing from this artifact manifest")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_roi)

    s = sub.add_parser("layers", help="per-layer quantization error of an artifact against the float model: each "
                       "conv/linear layer's output SQNR, and the end-to-end SQNR with that layer alone quantized")
    s.add_argument("artifact", type=Path, metavar="ARTIFACT")
    s.add_argument("--images", type=int, default=8, metavar="N", help="calibration images to measure on (default 8; "
                   "never evaluation images)")
    s.add_argument("--data", type=Path, help=data_help)
    s.add_argument("--threads", type=int, help="CPU threads for torch and the runtime")
    s.add_argument("--all-layers", action="store_true", help="list the float layers in the table too")
    s.add_argument("--json", type=Path, metavar="FILE")
    s.add_argument("--markdown", type=Path, metavar="FILE")
    s.add_argument("--plot", type=Path, metavar="FILE", help="PNG: both SQNRs along the network's depth")
    s.add_argument("--no-verify", action="store_true", help="run an artifact whose sha256 does not match its manifest")
    s.set_defaults(func=_cmd_layers)

    s = sub.add_parser("extract", help="write the .mlpackage inside a Core ML-delegated .pte (to open it in Xcode)")
    s.add_argument("artifact", type=Path, metavar="ARTIFACT.pte")
    s.add_argument("out", type=Path, metavar="OUT.mlpackage")
    s.set_defaults(func=_cmd_extract)

    s = sub.add_parser("classify", help="top-k class names with probabilities for images")
    s.add_argument("artifact", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--top", type=int, default=5)
    s.add_argument("--threads", type=int)
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-verify", action="store_true")
    s.set_defaults(func=_cmd_classify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Import-time chatter of the converter stack (missing CUDA kernels, untested-version notes).
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        # Converter progress bars (coremltools' tqdm, litert-torch's stage log) would bury ours.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return int(args.func(args))
    except EdgeConvNextError as e:
        if args.verbose:
            raise
        print(f"edge-convnext {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
