"""Evaluation apart from training: a trained run as a predictor, scored or applied.

    inference  `load_predictor(workdir)` -> `Predictor` (the one loader of a run)
    evaluate   `dlvae-jax evaluate`: metrics, per-patient CSV, figures of a split
    predict    `dlvae-jax predict`: masks, probabilities and overlays for new slices
    cli        the two commands' parsers

This package reads runs that `dlvae_jax.train` wrote. The training library
(state, step, runners, checkpoint, loop) never imports it; only the `train`
command does, to score the best checkpoint on the validation split at the end
(a run without validation patients: its last checkpoint on 6 training patients).
"""
