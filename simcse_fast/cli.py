"""The ``simcse-fast`` command.

``simcse-fast demo``: pools a random batch and scores it with InfoNCE, with every backend
that runs here, checks each against the float64 reference and prints the error and the time
of forward + backward.
``simcse-fast info``: versions, the compiled extension and the backends usable here.
``simcse-fast train`` / ``eval``: SimCSE training and STS evaluation; ``bench``: the benchmark.

Arguments are checked before PyTorch, Triton or transformers is imported (seconds on a cold
machine): each command adds its options only when it runs, ``train``'s are checked by
``TrainingConfig.validate`` (``simcse_fast.config``, no PyTorch), and errors name the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from . import __version__
from .config import BACKENDS, POOLING_MODES, TRAINING_MAX_SEQ_LENGTH, TrainingConfig, packed_attention_missing

DTYPE_NAMES = ("bfloat16", "float16", "float32")
TRAINING_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainingConfig)}
"""``simcse-fast train``'s defaults are ``TrainingConfig``'s, so the two cannot drift apart."""
USAGE_ERROR = 2
"""The exit status of a command refused for its arguments (argparse's)."""


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward_backward(fn, leaves: list, grad_out, repeats: int) -> float:
    """Median wall-clock milliseconds of one forward + backward after one warm-up call."""
    times = []
    for attempt in range(repeats + 1):
        _synchronize(grad_out.device)
        start = time.perf_counter()
        fn(*leaves).backward(grad_out)
        _synchronize(grad_out.device)
        if attempt:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _demo_op(name: str, ours, ref, inputs: list, grad_out, backends, repeats: int):
    """Print, per backend, the largest error of the output and input gradients against the
    float64 reference, and the time of forward + backward."""
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref(*inputs64).backward(grad_out.double())
    expected = ref(*inputs64).detach()
    for backend in backends:
        op = functools.partial(ours, backend=backend)
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = op(*leaves)
        out.backward(grad_out)
        errors = [(out.double() - expected).abs().max().item()]
        errors += [
            (leaf.grad.double() - leaf64.grad).abs().max().item()
            for leaf, leaf64 in zip(leaves, inputs64, strict=True)
        ]
        ms = _time_forward_backward(op, leaves, grad_out, repeats)
        print(f"{name:<16} {backend:<8} {max(errors):>24.3e} {ms:>11.3f}")


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from . import available_backends, functional, reference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype)
    generator = torch.Generator().manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    x = randn(args.batch, args.seq_len, args.hidden)
    lengths = torch.randint(1, args.seq_len + 1, (args.batch,), generator=generator)
    mask = (torch.arange(args.seq_len)[None, :] < lengths[:, None]).to(device)
    backends = [name for name in available_backends() if name != "triton" or device.type == "cuda"]

    print(f"simcse_fast {__version__} demo on {device} ({dtype}): token embeddings "
          f"{tuple(x.shape)}, {int(mask.sum())} of {mask.numel()} tokens present; InfoNCE over "
          f"{args.batch} anchors, {2 * args.batch} candidates (half of them hard negatives)")  # fmt: skip
    print(f"{'op':<16} {'backend':<8} {'max |error| vs float64':>24} {'fwd+bwd ms':>11}")
    for name in ("masked_mean_pool", "masked_max_pool"):
        ours = functools.partial(getattr(functional, name), attention_mask=mask)
        ref = functools.partial(getattr(reference, name), attention_mask=mask)
        _demo_op(name, ours, ref, [x], randn(args.batch, args.hidden), backends, args.repeats)
    anchors, candidates = randn(args.batch, args.hidden), randn(2 * args.batch, args.hidden)
    loss_grad = torch.ones((), device=device)
    _demo_op(
        "info_nce",
        functional.info_nce,
        reference.info_nce,
        [anchors, candidates],
        loss_grad,
        backends,
        args.repeats,
    )
    return 0


def _parse_sizes(text: str) -> dict:
    """``"32x128x384,512x768"`` -> pooling shapes (three numbers: B x L x H, for padded and
    packed pooling alike) and loss shapes (two numbers: N x D, for the loss and its recipes)."""
    sizes: dict[str, list[tuple[int, ...]]] = {"pooling": [], "packed": [], "loss": [], "recipes": []}
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            numbers = tuple(int(value) for value in item.lower().split("x"))
        except ValueError:
            numbers = ()
        if len(numbers) not in (2, 3) or min(numbers) < 1:
            raise argparse.ArgumentTypeError(
                f"--sizes: {item!r} is neither BxLxH (pooling) nor NxD (loss) with positive integers"
            )
        if len(numbers) == 3:
            sizes["pooling"].append(numbers)
            sizes["packed"].append(numbers)
        else:
            sizes["loss"].append(numbers)
            sizes["recipes"].append(numbers)
    return sizes


def _gigabytes(text: str) -> float:
    """``--memory-budget``'s value: a positive number of GB."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--memory-budget takes a positive number of GB, got {text!r}")
    return value


def run_bench(args: argparse.Namespace) -> int:
    """``simcse-fast bench``: run the benchmark, print its table and wall time, write the
    results with ``--out``, and warn on stderr when the timings say the machine was busy."""
    import torch

    from . import bench

    ops = tuple(dict.fromkeys(part.strip() for part in args.ops.split(",") if part.strip()))
    unknown = [op for op in ops if op not in bench.OPS]
    if unknown or not ops:
        families = " and/or ".join(bench.OPS)
        print(f"simcse-fast: error: --ops takes {families}, got {args.ops!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("simcse-fast: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    started = time.perf_counter()
    document = bench.run_benchmark(
        ops=ops, preset=args.preset, sizes=args.sizes, device=args.device,
        dtype=_dtype(args.dtype) if args.dtype else None, min_repeats=args.repeats,
        memory_budget_gb=args.memory_budget,
    )  # fmt: skip
    print()
    print(bench.markdown_table(document), end="")
    if args.out:
        for path in bench.write_results(document, Path(args.out)):
            print(f"wrote {path}")
    print(f"simcse-fast bench: {time.perf_counter() - started:.0f} s")
    busy = document["busy_warnings"]
    if busy:
        # On stderr, so that redirecting the table does not hide it; the table lists them all.
        more = f" (and {len(busy) - 1} more, listed under the table)" if len(busy) > 1 else ""
        print(
            f"simcse-fast bench: warning: the machine was busy (timings spread beyond p80/p20 = "
            f"{bench.BUSY_SPREAD}, or a pass slower than forward + backward): {busy[0]}{more}; "
            "rerun on an idle machine for reliable medians",
            file=sys.stderr,
        )
    return 0


def _rank() -> int:
    """This process's rank under torchrun (``RANK``), else 0."""
    return int(os.environ.get("RANK", "0"))


def _fail(message: str, code: int = 1) -> int:
    """Print ``message`` as the command's error (once under torchrun: from rank 0, since every
    process meets the same error) and return the exit status ``code``."""
    if _rank() == 0:
        print(f"simcse-fast: error: {message}", file=sys.stderr)
    return code


def _resume_command() -> str:
    """This command line with ``--resume`` (and without ``--overwrite``, which would delete the
    checkpoint it resumes from)."""
    words = [word for word in sys.argv if word != "--overwrite" and not word.startswith("--resume")]
    words[0] = Path(words[0]).name
    command = shlex.join([*words, "--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        command += "   (under torchrun, with the same --nproc_per_node)"
    return command


def _missing_file(path: str | None) -> str | None:
    """The error for an input file that does not exist, checked before the heavy imports."""
    return None if path is None or Path(path).is_file() else f"{path}: no such file"


def run_train(args: argparse.Namespace) -> int:
    options = {name: value for name, value in vars(args).items() if name not in ("command", "run")}
    options["show_progress_bar"] = not options.pop("no_progress")
    config = TrainingConfig(**options)
    try:
        config.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")), flags=True)
    except ValueError as error:
        return _fail(str(error), USAGE_ERROR)
    missing = _missing_file(config.sentences) or _missing_file(config.dev_sts)
    if config.packed:
        missing = missing or packed_attention_missing()
    if missing:
        return _fail(missing)

    from .evaluation import EvaluationDataError
    from .training import TrainingDataError, TrainingInterrupted, format_loss, train

    try:
        summary = train(config)
    except (TrainingDataError, EvaluationDataError, ValueError, FileNotFoundError) as error:
        return _fail(str(error))
    except OSError as error:
        return _fail(f"cannot load model {args.model!r}: {str(error).splitlines()[0]}")
    except TrainingInterrupted as stopped:
        if _rank() == 0:
            print(f"\nsimcse-fast: {stopped}; continue with:\n  {_resume_command()}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        if _rank() == 0:
            print(f"\ninterrupted; continue with:\n  {_resume_command()}", file=sys.stderr)
        return 130
    if summary["rank"] != 0:
        return 0  # under torchrun, rank 0 reports for all
    last = f"last loss {format_loss(summary['last_loss'])}"
    if summary["already_complete"]:
        print(
            f"the run in {summary['output']} was already complete: {summary['steps']} steps, {last}; nothing "
            "to train (a larger --max-steps or --epochs with --resume extends it)"
        )
    else:
        print(f"trained {summary['steps']} steps, {last}")
        print(_speed(summary))
    if summary["best_dev"] is not None:
        step = summary["best_dev_step"]
        which = "step 0, the base model" if step == 0 else f"step {step}"
        print(
            f"best dev Spearman x100 {summary['best_dev']:.2f} ({which}), saved in "
            f"{Path(summary['output']) / 'best'}"
        )
    length = f"max_seq_length {summary['max_seq_length']} ({summary['max_seq_length_source']})"
    print(f"model saved to {summary['output']} with {length}")
    return 0


def _speed(summary: dict) -> str:
    """The end summary's speed line: sentences per second over the training steps (checkpoints,
    dev evaluations and compiling not counted), the share of the steps' time spent outside the
    encoder, and the compile time."""
    line = (
        f"{summary['sentences']} sentences in {summary['seconds']:.1f} s: "
        f"{summary['sentences_per_s']:.1f} sentences/s"
    )
    if summary["outside_encoder"] is not None:
        line += f", {summary['outside_encoder']:.0%} of the time outside the encoder"
    if summary["compile_seconds"] is not None:
        line += f"; compiling the encoder took {summary['compile_seconds']:.1f} s more"
    return line


def run_eval(args: argparse.Namespace) -> int:
    missing = _missing_file(args.sts)
    if missing:
        return _fail(missing)

    from .encoder import SimCSE, quiet_transformers
    from .evaluation import EvaluationDataError, evaluate_sts, read_sts_pairs

    try:
        pairs = read_sts_pairs(args.sts)
        with quiet_transformers():
            model = SimCSE(args.model, pooling=args.pooling, max_seq_length=args.max_seq_length,
                           backend=args.backend, device=args.device)  # fmt: skip
    except EvaluationDataError as error:
        return _fail(str(error))
    except (OSError, ValueError) as error:
        return _fail(f"cannot load model {args.model!r}: {str(error).splitlines()[0]}")
    score = evaluate_sts(model, pairs, batch_size=args.batch_size, show_progress_bar=not args.no_progress)
    print(f"{args.sts}: {len(pairs.scores)} pairs, Spearman x100 of cosine similarity = {score:.2f}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import torch

    from . import _backends

    print(f"simcse_fast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as error:
        print(f"triton unavailable: {error}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
    print(f"compiled CUDA extension simcse_fast._C: {_backends.extension_build_status()}")
    print(f"backends usable here: {', '.join(_backends.available_backends())}")
    for backend, reason in _backends.unavailable_reasons().items():
        print(f"backend {backend!r} unavailable here: {reason}")
    _print_loss_strategy(torch)
    return 0


def _print_loss_strategy(torch) -> None:
    """The loss strategy setting: pinned, or timed at first use (``similarity.select``)."""
    from . import similarity

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    strategies = ", ".join(similarity.loss_strategies(device))
    try:
        pinned = similarity.pinned_strategy()
    except ValueError as error:
        print(f"loss strategy: {error}")
        return
    if pinned is not None:
        where = "" if device.type == "cuda" else " for CUDA tensors (CPU tensors run torch)"
        setting = f"{pinned}, pinned by {similarity.STRATEGY_ENV_VAR}{where}"
    elif device.type == "cuda":
        setting = (
            "auto: the fastest, timed at the first call per shape bucket (the choices are logged at debug "
            f"level on the 'simcse_fast' logger; {similarity.STRATEGY_ENV_VAR} pins one)"
        )
    else:
        setting = "torch (the only strategy for CPU tensors)"
    print(f"loss strategies here: {strategies}; {setting}")


def _positive_int(text: str) -> int:
    """An option's value: a positive integer (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with any word that starts like a number taken as a value: ``--lr -1e-5`` then
    reaches the option's check instead of failing as "expected one argument" (the matcher of
    Python < 3.14 does not recognize exponents). No option of this command looks like a number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def _demo_options(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--batch", type=_positive_int, default=64, help="sequences (B), default 64")
    demo.add_argument(
        "--seq-len", type=_positive_int, default=128, help="tokens per sequence (L), default 128"
    )
    demo.add_argument("--hidden", type=_positive_int, default=384, help="hidden size (H), default 384")
    demo.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    demo.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--repeats", type=_positive_int, default=10, help="timed repetitions, default 10")
    demo.add_argument("--seed", type=int, default=0)


def _bench_options(bench_parser: argparse.ArgumentParser) -> None:
    from . import bench

    bench_parser.add_argument(
        "--ops", default=",".join(bench.DEFAULT_FAMILIES),
        help=f"op families, comma-separated, among {', '.join(bench.OPS)} (default: "
        f"{','.join(bench.DEFAULT_FAMILIES)}; recipes: hardness weighting and GIST beside "
        "sentence-transformers)",
    )  # fmt: skip
    presets = bench_parser.add_mutually_exclusive_group()
    presets.add_argument(
        "--quick", dest="preset", action="store_const", const="quick",
        help="a few shapes (the loss swept over N), fewer timed runs, no torch.compile peer "
        "(under a minute on 2 CPU cores)",
    )  # fmt: skip
    presets.add_argument(
        "--full", dest="preset", action="store_const", const="full",
        help="the full sweep (on a GPU: loss N up to 2**20, pooling inputs up to 1 GiB)",
    )  # fmt: skip
    bench_parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        help="shapes instead of the preset's: BxLxH (pooling, packed), NxD (loss), comma-separated",
    )
    bench_parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on a GPU, float32 on a CPU"
    )
    bench_parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    bench_parser.add_argument(
        "--repeats", type=_positive_int,
        help="at least this many timed runs per pass (default: "
        f"{bench.MEASUREMENT['quick'][0]} with --quick, else {bench.MEASUREMENT['default'][0]})",
    )  # fmt: skip
    bench_parser.add_argument(
        "--memory-budget", type=_gigabytes, metavar="GB",
        help="skip a case whose estimated memory need exceeds this (default: the free GPU memory, "
        "half the available memory on a CPU)",
    )  # fmt: skip
    bench_parser.add_argument("--out", help="directory for results.json, results.md and PNG plots")
    bench_parser.set_defaults(preset="default")


def _train_options(train_parser: argparse.ArgumentParser) -> None:
    train_parser.add_argument("sentences", help="text file, one sentence per line (.gz works)")

    def training_option(name: str, **kwargs) -> None:
        """``--name`` of ``train``, defaulting to ``TrainingConfig``'s field ``name``."""
        train_parser.add_argument(f"--{name.replace('_', '-')}", default=TRAINING_DEFAULTS[name], **kwargs)

    training_option(
        "model", help="Hugging Face hub name or local folder to start from (default: %(default)s)"
    )
    train_parser.add_argument("--output", required=True, help="folder for checkpoints and the final model")
    training_option("batch_size", type=int, help="sentences per step (default: %(default)s)")
    training_option(
        "max_seq_length", type=int,
        help=f"tokens per sentence, in training and in the saved model (default: {TRAINING_MAX_SEQ_LENGTH} "
        "in training, and the base model's limit in the saved model)",
    )  # fmt: skip
    training_option("pooling", choices=POOLING_MODES, help="(default: %(default)s)")
    training_option("epochs", type=int, help="(default: %(default)s)")
    training_option("max_steps", type=int, help="stop after this many steps")
    training_option("lr", type=float, help="(default: %(default)s)")
    training_option("temperature", type=float, help="InfoNCE scale is 1/temperature (default: %(default)s)")
    training_option("warmup_ratio", type=float, help="(default: %(default)s)")
    training_option("checkpoint_steps", type=int, help="(default: %(default)s)")
    training_option("keep_checkpoints", type=int, help="(default: %(default)s)")
    training_option(
        "resume", nargs="?", const=True, choices=[True, "auto"], metavar="auto",
        help="continue from the latest checkpoint in --output (an error if there is none); "
        "--resume=auto starts a new run when there is none. A larger --max-steps or --epochs "
        "extends a run: the learning rate restarts at --lr and decays to 0 at the new total",
    )  # fmt: skip
    training_option(
        "overwrite", action="store_true",
        help="delete the simcse-fast run in --output first (by default a non-empty --output is refused)",
    )  # fmt: skip
    training_option("seed", type=int, help="(default: %(default)s)")
    training_option("backend", choices=BACKENDS, help="(default: %(default)s)")
    training_option("min_chars", type=int, help="skip shorter lines (default: %(default)s)")
    training_option("mlp_head", action="store_true", help="SimCSE's Linear+tanh head, in training only")
    training_option(
        "dev_sts",
        help="STS Benchmark or SICK file: evaluate the starting model and each checkpoint, keep the best",
    )
    training_option(
        "mini_batch_size", type=int,
        help="gradient caching: encode at most this many rows at a time (the loss sees the whole batch)",
    )  # fmt: skip
    training_option(
        "mini_batch_tokens", type=int,
        help="gradient caching: at most this many tokens (rows x longest row) per mini-batch",
    )  # fmt: skip
    training_option(
        "compile", action="store_true",
        help="run the encoder under torch.compile: batches padded to a few widths (the sequence length up "
        "to 64 tokens), compiled once each; compile time is reported apart",
    )  # fmt: skip
    training_option(
        "packed", action="store_true",
        help="unpadded batches through flash-attention's varlen kernels (needs flash-attn and a CUDA GPU)",
    )  # fmt: skip
    training_option(
        "log_steps", type=int,
        help="read the loss from the device every N steps for the bar (and at checkpoints); steps in "
        "between never wait for the device (default: %(default)s)",
    )  # fmt: skip
    training_option("device", help="cpu or cuda (default: cuda when available)")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _eval_options(eval_parser: argparse.ArgumentParser) -> None:
    eval_parser.add_argument(
        "--model", required=True, help="SimCSE or sentence-transformers folder, or HF name"
    )
    eval_parser.add_argument("--sts", required=True, help="STS Benchmark or SICK file")
    eval_parser.add_argument("--pooling", choices=POOLING_MODES, help="default: the folder's")
    eval_parser.add_argument("--max-seq-length", type=_positive_int, help="default: the folder's, else 32")
    eval_parser.add_argument("--batch-size", type=_positive_int, default=64)
    eval_parser.add_argument("--backend", choices=BACKENDS, help="default: SIMCSE_FAST_BACKEND, else auto")
    eval_parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    eval_parser.add_argument("--no-progress", action="store_true", help="no progress bar")


COMMANDS = {
    "demo": ("pool and score a random batch with every backend, check and time it", _demo_options, run_demo),
    "bench": (
        "time our ops and their peers, with the device's ceilings measured in the same run",
        _bench_options,
        run_bench,
    ),
    "train": ("unsupervised SimCSE from a file of sentences (one per line)", _train_options, run_train),
    "eval": ("Spearman x100 of cosine similarity on an STS file", _eval_options, run_eval),
    "info": ("versions, the compiled extension and the backends usable here", lambda parser: None, run_info),
}
"""Each command: its help line, the function that adds its options, the function that runs it."""


def build_parser(commands=tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The parser of every command, with the options of those in ``commands`` (adding
    ``bench``'s imports PyTorch, so ``main`` adds only the command it runs)."""
    parser = _Parser(
        prog="simcse-fast",
        description="Fused kernels for contrastive sentence-embedding training: check them (demo), "
        "list versions and backends (info), benchmark them (bench), train SimCSE (train), evaluate (eval).",
    )
    parser.add_argument("--version", action="version", version=f"simcse_fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_line, add_options, run) in COMMANDS.items():
        command = subparsers.add_parser(name, help=help_line)
        command.set_defaults(run=run)
        if name in commands:
            add_options(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option: the top level has no valued options.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
