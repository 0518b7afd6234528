"""`trt-nuwaxl` command line. User errors print one line naming the value and the fix, and exit with status 2;
warnings print one line each; Ctrl-C (SIGINT) and SIGTERM stop with one line (exit 130 / 143) after removing
unfinished outputs."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from nuwaxl.config import LARGE_VIDEO_FRAMES, SAMPLERS
from nuwaxl.engine.registry import BACKENDS, ENGINE_TORCH_MODES
from nuwaxl.errors import UserError, option, speaking_to_cli
from nuwaxl.iospec import ELEMENT_TYPES, ENGINE_PRECISIONS
from nuwaxl.train.data import STORY_VERSIONS

PRESET_NAMES = ("tiny", "small", "paper")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not None, not where the help text already names it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def bundled_story() -> Path:
    return Path(str(resources.files("nuwaxl").joinpath("assets/story.txt")))


def weights_source(args):
    """Where the weights come from, decided once (nuwaxl.weights): --engines, --checkpoint, --preset (random), else
    the bundled trained weights. Its card is read from a header or manifest only: no weights are loaded."""
    from nuwaxl.weights import WeightsSource

    return WeightsSource.resolve(checkpoint=getattr(args, "checkpoint", None), preset=getattr(args, "preset", None),
                                 engines=getattr(args, "engines", None))


def note_random_weights(card, doing: str = "generating from") -> None:
    """Say, wherever random weights are used, that the result will be noise-like and how to get trained ones."""
    if card.trained_on.trained:
        return
    fix = {"preset": "omit --preset for the bundled trained weights",
           "engines": "build engines from the bundled trained weights: trt-nuwaxl build --backend BACKEND --out DIR",
           "checkpoint": "use a trained checkpoint, or omit --checkpoint for the bundled trained weights"}
    print(f"note: {doing} random (untrained) weights ({card.source}), so the video is noise-like; "
          f"{fix[card.source.split()[0]]}", file=sys.stderr)


def read_story(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"story file not found: {path}; pass --story with a text file of one prompt per line") from None
    except IsADirectoryError:
        raise UserError(f"story path {path} is a directory; pass a text file of one prompt per line") from None
    except UnicodeDecodeError:
        raise UserError(f"story file {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
    except OSError as e:
        raise UserError(f"cannot read story file {path}: {e.strerror or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"story file {path} has no prompts; write one prompt per line ('#' starts a comment)")
    return prompts


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a long video from a story (one prompt per line)",
                       formatter_class=Help)
    p.add_argument("--story", default=None, help="text file, one prompt per line (default: the bundled example)")
    p.add_argument("--frames", type=positive_int, default=226, help="number of frames N")
    p.add_argument("--out", default="video.mp4", help="output .mp4 path")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="trt-nuwaxl .safetensors checkpoint "
                     "(default: the bundled trained weights)")
    src.add_argument("--preset", choices=PRESET_NAMES, default=None, help="random weights of a preset")
    src.add_argument("--engines", default=None, help="engine directory from trt-nuwaxl build")
    p.add_argument("--torch-mode", choices=ENGINE_TORCH_MODES, default=None,
                   help="with --engines of the torch backend: the AOTInductor packages (default) or live modules; "
                   "without --engines: eager (default), compile, cudagraph or compile-cudagraph (CUDA graphs around "
                   "torch.compile'd code: the fastest on a GPU, after minutes of compiling)")
    p.add_argument("--frames-per-call", "-L", type=positive_int, default=None, help="L (default: the model's)")
    p.add_argument("--depth", type=positive_int, default=None, help="m (default: the least that reaches N)")
    p.add_argument("--mode", choices=("dod", "ar"), default="dod",
                   help="dod: diffusion over diffusion; ar: autoregressive baseline (FDM*)")
    p.add_argument("--ar-context", type=positive_int, default=1, help="AR: frames carried into the next window")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps (default: what the weights recommend: 15 for the bundled ones, 25 otherwise)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddim; ddpm (ancestral); dpmpp-2m (DPM-Solver++(2M): fewer steps for the same quality) "
                        "(default: what the weights recommend: dpmpp-2m for the bundled ones, ddim otherwise)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 1 = off "
                   "(default: what the weights recommend: 3 for the bundled ones, 1 for random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=positive_int, default=None, help="frame size in px (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", *ELEMENT_TYPES), default="auto",
                   help="auto: fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--max-batch", type=positive_int, default=None, help="diffusion calls per batched model call "
                   "(default: a whole level)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="cap GPU memory at GIB GiB; a batch that does not fit is retried in halves (with a warning)")
    p.add_argument("--order", choices=("level", "depth"), default="level",
                   help="level: whole levels in few large batches (throughput); depth: the first frames' subtree "
                        "first, streaming frames in temporal order (latency; use with --max-batch)")
    p.add_argument("--fps", type=positive_int, default=8)
    p.add_argument("--sheet", default=None, help="PNG of the keyframe tree (default: OUT with _tree.png; "
                   "'none' to skip)")
    p.add_argument("--yes", action="store_true", help=f"go ahead with videos over the size that asks for "
                   f"confirmation (more than {LARGE_VIDEO_FRAMES} frames) without asking")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    from nuwaxl.runtime.distributed import init_from_env, world
    from nuwaxl.runtime.pipeline import LargeRequest, prepare
    from nuwaxl.runtime.video import check_writable, sheet_rows, tree_sheet, write_mp4, write_png
    from nuwaxl.tokenizer import PromptTokenizer

    out = check_writable(args.out, ".mp4", flag="--out")
    sheet = None if args.sheet == "none" else check_writable(args.sheet or out.with_name(out.stem + "_tree.png"),
                                                             ".png", flag="--sheet")
    prompts = read_story(args.story or bundled_story())
    source = weights_source(args)
    card = source.card()
    config = card.config
    if args.engines:  # built engines fix L, resolution and precision: check the request against them first
        for flag, asked, built in (("--frames-per-call", args.frames_per_call, card.frames_per_call),
                                   ("--resolution", args.resolution, config.resolution),
                                   ("--precision", None if args.precision == "auto" else args.precision,
                                    card.precision)):
            if asked is not None and asked != built:
                raise UserError(f"the engines in {args.engines} were built for {flag} {built}, not {asked}; "
                                f"drop {flag} or rebuild with trt-nuwaxl build {flag} {asked}")
    elif args.torch_mode == "aoti":
        raise UserError("--torch-mode aoti needs --engines DIR built with --backend torch")
    elif args.resolution:
        config = config.with_resolution(args.resolution)
    # Everything about the request is checked before any weights are built or loaded.
    large = None
    recommended = card.sampling
    kw = dict(num_inference_steps=recommended.num_inference_steps if args.steps is None else args.steps,
              seed=args.seed, mode=args.mode, frames_per_call=card.frames_per_call or args.frames_per_call,
              depth=args.depth, guidance_scale=recommended.guidance_scale if args.guidance is None else args.guidance,
              sampler=recommended.sampler if args.sampler is None else args.sampler, ar_context=args.ar_context,
              max_batch=args.max_batch, order=args.order,
              memory_budget_gib=args.memory_budget, allow_large=args.yes,
              tokenizer=PromptTokenizer(card.tokenizer_json, config.text.max_length), trained_on=card.trained_on)
    try:
        request = prepare(config, prompts, args.frames, **kw)
    except LargeRequest as e:
        large, request = e, e.request
    args.device = init_from_env(args.device)  # under torchrun: join the group, one GPU per rank
    rank, _ = world()
    if rank == 0:
        note_random_weights(card)
    pipe = load_pipeline(args, source)
    if large is not None:
        confirm_large(large, pipe)
    plan = request.plan
    if rank != 0:  # other ranks compute their share of every batch; rank 0 writes the outputs
        for _ in pipe.run(request, progress=False):
            pass
        return
    print(f"{args.frames} frames, mode {plan.mode}, L={plan.frames_per_call}, depth {plan.depth}, "
          f"calls per level {[len(level) for level in plan.levels]}, "
          f"{request.options.num_inference_steps} {request.options.sampler} steps, "
          f"guidance {request.options.guidance_scale:g}, "
          f"{pipe.nets.spec.backend} on {pipe.nets.spec.device} {str(pipe.nets.spec.dtype).removeprefix('torch.')}",
          file=sys.stderr)
    draw_sheet = sheet is not None and plan.mode == "dod"  # an AR "tree" is just a chain of windows
    keep = {p for _, row in sheet_rows(plan) for p in row} if draw_sheet else set()
    kept = {}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def stream():
        for pos, frame in pipe.run(request, progress=not args.quiet, timings=timings):
            if pos in keep:
                kept[pos] = frame
            yield frame

    count = write_mp4(stream(), out, fps=args.fps)
    if draw_sheet:
        write_png(tree_sheet(kept, plan), sheet)
    print(f"wrote {out} ({count} frames) in {time.perf_counter() - t0:.1f} s"
          + (f", keyframe tree {sheet}" if draw_sheet else ""), file=sys.stderr)


def load_pipeline(args, source):
    from nuwaxl.engine.torch_backend import resolve_device
    from nuwaxl.runtime.pipeline import Pipeline

    resolve_device(args.device)
    if source.kind == "engines":
        return Pipeline.from_source(source, device=None if args.device == "auto" else args.device,
                                    torch_mode=args.torch_mode or "aoti")
    return Pipeline.from_source(source, device=args.device, precision=args.precision, resolution=args.resolution,
                                torch_mode=args.torch_mode or "eager")


def confirm_large(large, pipe) -> None:
    """A video over the confirmation size: time one denoising step here, then ask (or, with no terminal to ask
    on, stop with what it would take and the flag that goes ahead)."""
    per_step = pipe.seconds_per_call_step(large.request)
    total = per_step * large.request.call_steps
    when = f"{total / 3600:.1f} h" if total >= 3600 else f"{total / 60:.0f} min" if total >= 60 else f"{total:.0f} s"
    estimate = (f"denoising alone would take up to {when} here (one call's step timed at {per_step * 1e3:.0f} ms; "
                "batching makes a GPU faster than that)")
    if not sys.stdin.isatty():
        raise UserError(f"{large}; {estimate}")
    answer = input(f"{large}.\n{estimate}.\nContinue? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise UserError("cancelled; nothing was generated")


def add_build(sub) -> None:
    p = sub.add_parser("build", help="export ONNX and build engines into a directory", formatter_class=Help)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="trt-nuwaxl .safetensors checkpoint "
                     "(default: the bundled trained weights)")
    src.add_argument("--preset", choices=PRESET_NAMES, default=None, help="random weights of a preset "
                     "(for speed tests)")
    p.add_argument("--backend", choices=BACKENDS, required=True,
                   help="tensorrt: plans via tensorrt or tensorrt_rtx; onnxruntime: ONNX for the CUDA/CPU provider; "
                        "torch: AOTInductor packages")
    p.add_argument("--precision", choices=ENGINE_PRECISIONS, default="fp16")
    p.add_argument("--max-rows", type=positive_int, default=16,
                   help="largest batch the engines accept, in rows: diffusion calls, twice that many with "
                        "guidance (generate's --max-batch counts calls); larger batches are split")
    p.add_argument("--out", required=True, help="engine directory")
    p.add_argument("--resolution", type=positive_int, default=None)
    p.add_argument("--frames-per-call", "-L", type=positive_int, default=None)
    p.add_argument("--device", default="auto", help="device for export, parity and AOTInductor")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), help="TensorRT builder optimization level")
    p.add_argument("--compute-capability", action="append", default=None,
                   help="TensorRT-RTX target GPU, e.g. sm89 (repeatable; default: this GPU, or sm89)")
    p.add_argument("--parity", default="min,opt,max", help="batch sizes for the parity check, or 'none'")
    p.add_argument("--force", action="store_true", help="rebuild every stage even if its cache key matches")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> None:
    from nuwaxl.build import build

    note_random_weights(weights_source(args).card(), doing="building from")
    t0 = time.perf_counter()
    manifest = build(args.out, args.backend, args.precision, args.max_rows, checkpoint=args.checkpoint,
                     preset_name=args.preset, resolution=args.resolution, frames_per_call=args.frames_per_call,
                     device=args.device, opt_level=args.opt_level, targets=args.compute_capability,
                     parity=args.parity, force=args.force, progress=not args.quiet,
                     log=lambda msg: print(msg, file=sys.stderr))
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in manifest["timings_s"].items())
    print(f"wrote {args.out} ({args.backend}, {args.precision}, rows 1..{args.max_rows}) in "
          f"{time.perf_counter() - t0:.1f} s: {stages}", file=sys.stderr)


def add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="which backends, GPUs and versions are usable here, and why not")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> None:
    import json

    from nuwaxl.doctor import report

    r = report()
    print(json.dumps(r, indent=2))
    for name, item in r["backends"].items():
        verdict = "usable" if item["usable"] else f"not usable: {item['why']}"
        print(f"{name:22s} {verdict}", file=sys.stderr)


def add_info(sub) -> None:
    p = sub.add_parser("info", help="show a preset's or checkpoint's config and parameter counts")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", default=None)
    src.add_argument("--preset", choices=PRESET_NAMES, default=None)
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> None:
    import json

    import torch

    from nuwaxl.config import preset
    from nuwaxl.models.checkpoint import NuwaModels, read_config

    config = read_config(args.checkpoint) if args.checkpoint else preset(args.preset)
    with torch.device("meta"):  # shapes only: no memory, no init time, even for the 1 B-parameter preset
        counts = NuwaModels(config).num_parameters()
    counts["total"] = sum(counts.values())
    print(json.dumps({"name": config.name, "resolution": config.resolution, "frames_per_call": config.frames_per_call,
                      "latent_shape": [config.vae.latent_channels, config.latent_size, config.latent_size],
                      "parameters": counts}, indent=2))
    print(f"{config.name}: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()) + " parameters",
          file=sys.stderr)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the T-KLVAE and the MTD (one stage per call; resumes an unfinished one)",
                       formatter_class=Help)
    p.add_argument("--run", required=True, help="run folder: weights, optimizer state, log.jsonl, summary.json")
    p.add_argument("--stage", required=True, choices=("vae-image", "vae-temporal", "mtd"))
    p.add_argument("--steps", type=positive_int, required=True, help="total steps of the stage")
    p.add_argument("--preset", choices=PRESET_NAMES, default="small", help="architecture of a new run")
    p.add_argument("--init", default=None, help="start a new run from this checkpoint instead of random weights")
    p.add_argument("--videos", default=None, help="folder of your own videos (default: the procedural stories)")
    p.add_argument("--captions", default=None, help="with --videos: .json or .csv with one caption per frame")
    p.add_argument("--stories", type=positive_int, default=64, help="procedural stories to train on")
    p.add_argument("--story-frames", type=positive_int, default=3376, help="frames per procedural story")
    p.add_argument("--data-seed", type=int, default=0, help="procedural stories of this seed (held out: seed+1000)")
    p.add_argument("--story-version", type=int, choices=STORY_VERSIONS, default=1,
                   help="procedural stories: 1 flat shapes (the bundled weights), 2 figures with moving limbs and "
                   "state the captions do not mention (outfits, a boulder, fading daylight)")
    p.add_argument("--ar-fraction", type=float, default=0.2,
                   help="mtd: share of autoregressive clips (consecutive frames, the first given); 1 trains the "
                   "paper's FDM* baseline (short clips only), to be run with generate --mode ar")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--depth", type=positive_int, default=3, help="mtd: deepest tree sampled")
    p.add_argument("--save-every", type=positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the clip sampling and the noise (a continuation "
                   "from --init should use a new one)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training in this call")
    p.add_argument("--at-limit", choices=("pause", "finish"), default="pause",
                   help="at the time limit: save and resume later, or end the stage with the steps done")
    p.add_argument("--workers", type=positive_int, default=1, help="processes rendering the procedural stories")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="mtd on CUDA: run every step eagerly instead of "
                   "replaying it as one CUDA graph (the same step; eager is slower for small models)")
    p.add_argument("--compile", action="store_true", help="mtd: compile the step's forward and backward with "
                   "torch.compile (fewer, fused kernels; the first steps pay minutes of compilation)")
    p.add_argument("--export", default=None, help="also write the run's weights as an fp16 checkpoint here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    import json

    import torch

    from nuwaxl.config import preset
    from nuwaxl.engine.torch_backend import resolve_device
    from nuwaxl.models.checkpoint import NuwaModels, load_checkpoint, save_checkpoint
    from nuwaxl.train.trainer import TrainOptions, run_stage
    from nuwaxl.train.videos import folder_corpus, synthetic_corpus

    opts = TrainOptions(args.stage, args.steps, batch=args.batch, lr=args.lr, depth=args.depth,
                        ar_fraction=args.ar_fraction, save_every=args.save_every, seed=args.seed,
                        time_limit_s=args.time_limit, at_limit=args.at_limit, cuda_graphs=not args.no_cuda_graphs,
                        compile=args.compile)
    device = resolve_device(args.device)
    current = Path(args.run) / "models.safetensors"
    if current.is_file():  # an existing run continues with its own weights and architecture
        init = load_checkpoint(current)
    else:
        init = load_checkpoint(args.init) if args.init else NuwaModels.random(preset(args.preset))
    res = init.config.resolution
    if (args.videos is None) != (args.captions is None):
        raise UserError("--videos and --captions go together: a folder of videos and their per-frame captions")
    holdout = synthetic_corpus(args.data_seed + 1000, 4, args.story_frames, res, args.workers,
                               version=args.story_version)
    if args.videos:
        videos = folder_corpus(args.videos, args.captions, res)
    else:
        videos = synthetic_corpus(args.data_seed, args.stories, args.story_frames, res, args.workers,
                                  version=args.story_version)
    summary = run_stage(args.run, opts, videos, holdout, init, device, progress=not args.no_progress)
    if args.export:
        models = load_checkpoint(Path(args.run) / "models.safetensors")
        save_checkpoint(models, args.export, dtype=torch.float16)
    print(json.dumps(summary))


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="generate held-out procedural stories and score them (Avg-FD, Block-FD-16, "
                       "caption-attribute accuracy, character consistency, motion; on version-2 stories also identity "
                       "stability and long-term coherence)",
                       formatter_class=Help)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="trt-nuwaxl .safetensors checkpoint (default: bundled)")
    src.add_argument("--preset", choices=PRESET_NAMES, default=None, help="random weights of a preset")
    p.add_argument("--frames", type=positive_int, default=256)
    p.add_argument("--mode", choices=("dod", "ar"), default="dod")
    p.add_argument("--depth", type=positive_int, default=None)
    p.add_argument("--stories", type=positive_int, default=4, help="held-out stories generated")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps (default: what the weights recommend, as generate)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="(default: what the weights recommend)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 1 = off "
                   "(default: what the weights recommend)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--probe", default=None, help="frame probe weights (default: bundled)")
    p.add_argument("--out", default=None, help="also write the scores to this .json file")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> None:
    import json

    from nuwaxl.runtime.pipeline import Pipeline
    from nuwaxl.train.evaluate import evaluate_generation, load_probe

    probe = load_probe(args.probe)
    source = weights_source(args)
    card = source.card()
    note_random_weights(card, doing="evaluating")
    pipe = Pipeline.from_source(source, device=args.device)
    scores = evaluate_generation(pipe, args.frames, args.mode, args.depth, args.stories, args.steps, args.seed, probe,
                                 guidance_scale=args.guidance, sampler=args.sampler)
    scores["weights"] = card.source + ("" if card.trained_on.trained else " (random weights)")
    text = json.dumps(scores, indent=1)
    if args.out:
        from nuwaxl.files import write_text

        write_text(args.out, text)
    print(text)


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve video generation over HTTP, the pipeline kept warm between requests",
                       formatter_class=Help)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="trt-nuwaxl .safetensors checkpoint "
                     "(default: the bundled trained weights)")
    src.add_argument("--preset", choices=PRESET_NAMES, default=None, help="random weights of a preset")
    src.add_argument("--engines", default=None, help="engine directory from trt-nuwaxl build")
    p.add_argument("--torch-mode", choices=ENGINE_TORCH_MODES, default=None, help="as for generate")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", *ELEMENT_TYPES), default="auto",
                   help="auto: fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--resolution", type=positive_int, default=None, help="frame size in px (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data", default="nuwaxl-serve", help="folder for the job database, frames and videos")
    p.add_argument("--max-queue", type=positive_int, default=16, help="jobs waiting at most (more: HTTP 429)")
    p.add_argument("--max-active", type=positive_int, default=4,
                   help="jobs running at once, their denoising steps batched into one model call")
    p.add_argument("--warm-rows", type=int, default=None,
                   help="before serving, capture the batched denoising step's CUDA graphs for every row bucket up "
                        "to this many rows (default on a GPU: twice --max-active, one guided call per job; 0: none)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    try:
        import uvicorn

        from nuwaxl.serve import Server, create_app, default_warm_rows
    except ImportError as e:
        raise UserError(f"serving needs the serve extra ({e.name} is missing): pip install \".[serve]\"") from None
    source = weights_source(args)
    note_random_weights(source.card(), "serving")
    pipeline = load_pipeline(args, source)
    warm = args.warm_rows if args.warm_rows is not None else \
        default_warm_rows(args.max_active, pipeline.nets.spec.device)
    if warm < 0:
        raise UserError(f"{option('warm_rows', warm)}: use 0 (no warm-up) or more rows")
    if warm:
        print(f"capturing the denoising step for up to {warm} rows before serving", file=sys.stderr)
    server = Server(pipeline, args.data, args.max_queue, args.max_active, warm_rows=warm)
    print(f"serving on http://{args.host}:{args.port} (jobs in {server.data})", file=sys.stderr)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trt-nuwaxl", description="NUWA-XL long video generation")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_build(sub)
    add_doctor(sub)
    add_info(sub)
    add_train(sub)
    add_eval(sub)
    add_serve(sub)
    return parser


class Terminated(Exception):
    """SIGTERM, raised in the main thread so that cleanup (unfinished outputs) runs as on Ctrl-C."""


@contextmanager
def one_line_warnings():
    """Warnings as `trt-nuwaxl: warning: ...`, one line each, instead of Python's file:line and source line."""
    show = warnings.showwarning

    def shown(message, category, filename, lineno, file=None, line=None):
        print(f"trt-nuwaxl: warning: {message}", file=sys.stderr)

    warnings.showwarning = shown
    try:
        yield
    finally:
        warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with speaking_to_cli(), one_line_warnings():
            args.func(args)
    except UserError as e:
        print(f"trt-nuwaxl: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # non-finite frames: what went wrong and what to change, without a traceback
        print(f"trt-nuwaxl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntrt-nuwaxl: interrupted; unfinished outputs were removed", file=sys.stderr)
        return 130
    except Terminated:
        print("trt-nuwaxl: terminated (SIGTERM); unfinished outputs were removed", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
