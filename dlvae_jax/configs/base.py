"""The fields every config shares; each named config starts from `base()`."""

from __future__ import annotations

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.data = dict(
        data_dir="",           # a kaggle_3m-layout folder; "" = synthetic phantoms written into the workdir
        channels="flair",      # "flair" (C = 1) or "all" (pre-contrast, FLAIR, post-contrast)
        image_size=256,        # side the model sees; slices are resized on the device
        split_seed=0,
        fractions=(0.7, 0.15, 0.15),
        synth_patients=8,      # synthetic data only
        synth_slices=20,
        synth_size=256,
        synth_seed=0,
        num_threads=2,         # host reader threads
        source="auto",         # "memory", "array_record" or "auto" (memory up to 512 MiB of slices per process)
        cache_dir="",          # array_record cache folder; "" = WORKDIR/cache
        tfds_dir="",           # a `dlvae-jax data build` folder to read instead of a cache (train --tfds-dir)
    )
    c.augment = dict(
        p_flip_lr=0.5, p_flip_ud=0.0, max_rotate_deg=10.0, max_scale=0.1,
        max_contrast=0.1, max_brightness=0.05,
        p_missing_sequence=0.0,  # pre- / post-contrast replaced by FLAIR, as the LGG data marks a missing sequence
    )
    c.preprocess = dict(
        equalize="head",       # "head" (the project's default) or "whole" (the paper's order)
        k=4,                   # K-means clusters of view B2
        n_init=3,              # K-means restarts per slice and step
    )
    c.model = dict(name="dlvae_cnn", dtype="float32")
    # One weight and one schedule per loss term (`dlvae_jax.losses`): a term
    # registered with `@losses.term(name)` is switched on by a weight here.
    c.loss = dict(
        weights=dict(kl=1.0, reconstruction=1.0, cosine=1.0, latent_classification=1.0, classification=1.0,
                     segmentation=1.0),
        # "constant", "linear:N" (0 -> 1 over N steps) or "cyclical:N[:R]" (cycles of N steps)
        schedules=dict(kl="linear:500", reconstruction="constant", cosine="constant",
                       latent_classification="constant", classification="constant", segmentation="constant"),
        free_bits=0.0, seg_dice_weight=1.0, seg_bce_weight=1.0, dice_smooth=1.0,
        dice_fn_weight=0.5,         # soft Dice as Tversky's index: weight of false negatives (0.5 = Dice)
        dice_kind="slice",          # "slice" (soft Dice per slice, batch mean) or "batch" (one Dice over the batch)
        reconstruction_kind="bce",  # "bce" (Bernoulli likelihood), "l2" or "l1"
        reduction="pixel",          # "pixel" (ELBO / pixels), "sum" (ELBO in nats) or "mean" (literal Eqs. 6-7)
    )
    c.optimizer = dict(
        learning_rate=1e-3, warmup_steps=100, end_lr_factor=0.01, weight_decay=1e-4,
        b1=0.9, b2=0.999, clip_norm=1.0, accumulate_steps=1,
    )
    c.train = dict(
        batch_size=16, steps=1000, seed=0,
        log_every=10, eval_every=200, checkpoint_every=200, keep_checkpoints=2,
    )
    c.eval = dict(
        batch_size=32, overlays=6,
        tta=False,             # predict as the mean over the slice and the flips it trained with (evaluate, predict)
        min_component=0,       # tumor components smaller than this (pixels at the data's size) are removed
        presence="class",      # a slice is "tumor" when: "class" the class head says so; "mask" its mask is not empty
        min_volume_share=0.0,  # a patient's 3D tumor components under this share of its largest are removed (0: none)
    )
    return c
