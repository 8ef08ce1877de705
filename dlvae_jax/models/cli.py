"""`dlvae-jax models`: list the models, with `--summary` their parameter
counts and forward FLOPs per slice."""

from __future__ import annotations

import argparse

from dlvae_jax.errors import DlvaeError

_SIZE_DEFAULT = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the models; --summary prints parameters and FLOPs per slice",
        description="List the registered models (default configurations). With --summary, print each "
        "model's trainable parameter count and forward FLOPs for one slice (batch of 1), counted by "
        "XLA's cost analysis of the lowered computation (a multiply-add counts 2).",
    )
    parser.add_argument("--summary", action="store_true", help="print parameters and FLOPs per slice")
    parser.add_argument("--size", type=int, default=_SIZE_DEFAULT, help="slice side in pixels (default 256)")
    parser.add_argument("--channels", type=int, default=3, help="image channels (default 3, the LGG RGB slices)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="models to include (default: all)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="computation dtype (parameters stay float32)"
    )
    parser.set_defaults(func=_handle)


def summary_rows(names, size: int, channels: int, dtype: str) -> list[tuple[str, int, float, float]]:
    """(name, parameters, train-forward GFLOPs, inference GFLOPs) per model,
    from abstract shapes only: nothing is initialized or compiled."""
    from dlvae_jax.models.registry import abstract_variables, count_params, example_inputs, forward_flops, get_model

    rows = []
    for name in names:
        model = get_model(name, dtype=dtype)
        inputs = example_inputs(1, size, channels)
        variables = abstract_variables(model, inputs)
        train_flops = forward_flops(model, variables, inputs, train=True)
        infer_flops = forward_flops(model, variables, dict(inputs, label_B=None), train=False)
        rows.append((name, count_params(variables), train_flops / 1e9, infer_flops / 1e9))
    return rows


def _handle(args: argparse.Namespace) -> int:
    from dlvae_jax.models.registry import MODEL_NAMES, MODELS

    names = args.names or list(MODEL_NAMES)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise DlvaeError(f"unknown model(s) {', '.join(unknown)}; known models: {', '.join(MODEL_NAMES)}")
    if not args.summary:
        for name in names:
            print(f"{name:10s} {MODELS[name].description}")
        return 0
    divisor = 2**5  # the deepest default model (vgg16) pools five times
    if args.size <= 0 or args.size % divisor:
        raise DlvaeError(f"--size must be a positive multiple of {divisor}, got {args.size}")
    rows = summary_rows(names, args.size, args.channels, args.dtype)
    print(f"models at {args.size}x{args.size}x{args.channels}, batch 1, compute {args.dtype}, params float32")
    print(f"{'model':10s} {'params':>12s} {'GFLOPs train fwd':>17s} {'GFLOPs inference':>17s}")
    for name, params, train_g, infer_g in rows:
        print(f"{name:10s} {params:12,d} {train_g:17.2f} {infer_g:17.2f}")
    print("train fwd: label given, one pass; inference: train=False (dlvae_cnn resolves the label, docs/models.md)")
    return 0
