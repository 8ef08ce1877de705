"""`dlvae-jax evaluate` and `dlvae-jax predict`.

The handlers import their modules on first use, so building the parser
(every `dlvae-jax` call) does not import JAX.
"""

from __future__ import annotations

import argparse

import sys

_CHECKPOINTS = ("best", "latest")


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _cmd_evaluate(args) -> int:
    from dlvae_jax.eval import evaluate

    report = evaluate.evaluate(
        args.workdir,
        data_dir=args.data_dir,
        split=args.split,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        n_overlays=args.overlays,
        progress=_progress(args),
        empty=args.empty,
        samples=args.samples,
        tta=args.tta,
        min_component=args.min_component,
        presence=args.presence,
        min_volume_share=args.min_volume_share,
        seed=args.seed,
    )
    split = report["split"]
    print(evaluate.format_table(report))
    print(f"\nwrote {args.workdir}: metrics_{split}.json, metrics.json, per_patient_{split}.csv, eval_{split}/")
    return 0


def _cmd_predict(args) -> int:
    from dlvae_jax.eval import predict

    rows = predict.predict(
        args.workdir,
        args.inputs,
        args.out,
        checkpoint=args.checkpoint,
        samples=args.samples,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=_progress(args),
        tta=args.tta,
        min_component=args.min_component,
        presence=args.presence,
        min_volume_share=args.min_volume_share,
    )
    n_tumor = sum(r["tumor"] for r in rows)
    print(f"{len(rows)} slices, {n_tumor} called tumor; wrote {args.out} (predictions.jsonl, masks, overlays"
          + (", mean and entropy maps)" if args.samples else ")"))
    return 0


def _prediction_flags(p) -> None:
    """--tta, --min-component, --presence and --min-volume-share, shared by evaluate and predict."""
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="predict as the mean over each slice and the flips the run trained with (augment.p_flip_lr, "
                        "p_flip_ud), and (evaluate) score the flips' uncertainty maps unless --samples is given; --no-tta "
                        "predicts single passes (default: the run's eval.tta)")
    p.add_argument("--min-component", type=int, default=None, metavar="N",
                   help="remove predicted tumor components smaller than N pixels (default: the run's "
                        "eval.min_component)")
    p.add_argument("--presence", choices=("class", "mask"), default=None,
                   help="what calls a slice tumor: class, the class head (a slice it calls no tumor gets an empty "
                        "mask); mask, a non-empty mask (default: the run's eval.presence)")
    p.add_argument("--min-volume-share", type=float, default=None, metavar="S",
                   help="remove a patient's 3D tumor components (its slices stacked in order; for predict, each "
                        "case) smaller than S times its largest; 1 keeps the largest only, 0 none removed "
                        "(default: the run's eval.min_volume_share)")


def register(subparsers) -> None:
    from dlvae_jax.eval.evaluate import SPLIT_CHOICES

    p = subparsers.add_parser(
        "evaluate",
        help="score a trained workdir on a split: metrics.json, per-patient CSV, plots, table beside the paper's",
        description="Score a trained workdir's best (or latest) checkpoint on the slices of a split and "
                    "write, into the workdir: metrics_<split>.json, per_patient_<split>.csv, metrics.json (the "
                    "latest evaluation) and eval_<split>/ (Dice per patient, confusion matrix, overlays). A slice's "
                    "mask is the pixels with probability >= 0.5; the slice is called tumor when the class head's "
                    "probability is >= 0.5 (--presence class; its mask is emptied otherwise) or when its mask is "
                    "not empty (--presence mask). Prints our figures beside the "
                    "paper's Tables I-IV. Keys and empty-mask rules: docs/evaluate.md.",
    )
    p.add_argument("--workdir", required=True, help="training folder (holds config.json, splits.json, checkpoints/)")
    p.add_argument("--data-dir", default=None,
                   help="LGG-layout folder; default: the one training used (config data.data_dir, else WORKDIR/data)")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="test",
                   help="patients to score: a split of WORKDIR/splits.json, or all of the data folder (default test)")
    p.add_argument("--checkpoint", choices=_CHECKPOINTS, default="best", help="checkpoint to load (default best)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per predictor call (default: the config's eval.batch_size)")
    p.add_argument("--overlays", type=int, default=None,
                   help="patients to draw an overlay sheet for (best, median and worst tumor slice and the largest "
                        "false positive), spread from the best Dice per volume to the worst; 0 for none "
                        "(default: the config's eval.overlays)")
    p.add_argument("--samples", type=int, default=0,
                   help="DL-VAE-CNN: also score uncertainty maps from N latent draws of the label-free posterior "
                        "(AUROC of entropy for pixel errors, ECE, reliability.png); default 0")
    _prediction_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default 0)")
    p.add_argument("--empty", choices=("one", "exclude"), default="one",
                   help="how a patient (or slice) with no tumor in truth or prediction enters the Dice and IoU "
                        "means: one scores it 1 (default); exclude leaves it out, as nnU-Net does")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser(
        "predict",
        help="masks, probabilities, uncertainty and overlays for slice images, patient folders or NIfTI volumes",
        description="Predict tumor masks with a trained workdir's model. INPUT is a slice image of any name "
                    "(TIFF or PNG; one channel is FLAIR, three are pre-contrast, FLAIR, post-contrast), a folder "
                    "of them (a patient; label and output files such as *_mask.* are skipped, every NIfTI file "
                    "in it is its own case), or a NIfTI volume (.nii, .nii.gz; (X, Y, Z) FLAIR or (X, Y, Z, 3); "
                    "each axial slice data[:, :, k] is predicted). Intensities: 8-bit data is used as it is; "
                    "other data (16-bit, float) is mapped linearly, minimum to 0 and 99.5th percentile to 255, "
                    "clipped, each channel on its own, per slice file or per NIfTI volume. Each volume, and the "
                    "slice images of each folder, is a case; --out gets, per case, <case>/<case>_mask.nii.gz (0/1), _prob.nii.gz and "
                    "_entropy.nii.gz with the input's affine (identity, with <case>_image.nii.gz beside them, "
                    "for slice files), and per slice <stem>_mask.tif (0/255, the dataset's convention), "
                    "_prob.npy and _overlay.png; plus predictions.jsonl. With --samples N (DL-VAE-CNN only) "
                    "also the mean probability and its entropy over N latent samples, with colour bars. --out "
                    "is built beside its place and renamed in at the end.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="slice image (.tif, .tiff, .png), folder of them, or NIfTI volume (.nii, .nii.gz)")
    p.add_argument("--workdir", required=True, help="training folder to load the model from")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--checkpoint", choices=_CHECKPOINTS, default="best", help="checkpoint to load (default best)")
    p.add_argument("--samples", type=int, default=0,
                   help="stochastic predictions per slice for the mean and entropy maps (default 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    _prediction_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)
