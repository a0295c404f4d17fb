"""The `tfopt` command (also `python -m tfopt`).

The application layer: it sits on top of the core, `tfopt.callbacks` and
`tfopt.tflite_export` (the only module of the core that imports them).
Errors a user can fix print as one line and exit with code 2.
"""

import argparse
import os
import sys

__all__ = ["main"]


def _demo(args):
    from tfopt.demo import run_demo

    epochs = (1, 2, 1) if args.quick else (args.float_epochs, args.prune_epochs, args.qat_epochs)  # float, prune, QAT
    run_demo(args.out, *epochs, seed=args.seed, verbose=0 if args.quiet else 1)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tfopt",
        description="Model optimization for Keras 3: pruning, QAT, verified int8 TFLite export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="train, prune, QAT and export int8 for the Edge TPU on MNIST (offline)")
    demo.add_argument("--out", default="tfopt_artifacts", help="folder for the artifacts (default: %(default)s)")
    demo.add_argument("--float-epochs", type=int, default=8)
    demo.add_argument("--prune-epochs", type=int, default=6)
    demo.add_argument("--qat-epochs", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="1-2 epochs per stage (a smoke run)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_demo)
    from tfopt.tflite_export._cli import add_subcommands

    add_subcommands(sub)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        message = " ".join(str(e).split())
        print(f"tfopt {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
