"""Whether the VAE carries information: the diagnostics against hand-computed
references, and a short training whose label-free posterior is used (active
units, KL) where the literal per-value scaling of Eqs. 6-7 collapses it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlvae_jax import configs, metrics
from dlvae_jax.models import apply_model, example_inputs, get_model
from dlvae_jax.train import experiment as ex
from dlvae_jax.train.loop import train
from dlvae_jax.train.step import PROBES, PrepConfig, eval_outputs

# ------------------------------------------------------------ diagnostics by hand


def test_latent_report_by_hand():
    # 4 slices, 3 dimensions: variances 0 (constant), 0.25 / 4 * ... by hand
    means = np.array([[0.0, 1.0, 0.10], [0.0, -1.0, 0.12], [0.0, 1.0, 0.08], [0.0, -1.0, 0.10]])
    kl = np.array([[0.0, 1.0, 0.5], [0.0, 3.0, 0.5], [0.0, 1.0, 0.5], [0.0, 3.0, 0.5]])
    r = metrics.latent_report(means, kl, {"a": 1, "b": 2})
    # Var of dimension 1 is 1 (> 0.01, active); dimension 2 varies by 2e-4 (inactive).
    assert r["active_units"] == 1 and r["n_dims"] == 3 and r["n_slices"] == 4
    np.testing.assert_allclose(r["kl_per_dim"], [0.0, 2.0, 0.5])
    assert r["kl_nats"] == pytest.approx(2.5)
    assert r["per_latent"] == {"a": {"kl_nats": 0.0, "active_units": 0, "n_dims": 1},
                               "b": {"kl_nats": pytest.approx(2.5), "active_units": 1, "n_dims": 2}}
    np.testing.assert_allclose(r["mean_variance_per_dim"], np.var(means, axis=0))


def test_probe_report_by_hand():
    truth = np.zeros((3, 4, 4), bool)
    truth[0, :2, :2] = True                      # patient p: slice 0 has 4 tumor pixels
    truth[2, 0, 0] = True                        # patient q: slice 2 has 1
    pred = truth.copy()                          # as encoded: perfect
    probe = np.zeros_like(truth)
    probe[0, 0, :2] = True                       # 2 of the 4 pixels, nothing on q
    patients = ["p", "p", "q"]
    base = metrics.probe_counts(pred, truth, pred.any(axis=(1, 2)))
    zeros = metrics.probe_counts(probe, truth, probe.any(axis=(1, 2)))
    r = metrics.probe_report(base, {"zeros": zeros}, patients)
    assert r["dice_volume_mean"] == 1.0 and r["slice_accuracy"] == 1.0
    # p: Dice 2*2 / (2 + 4) = 2/3; q: missed, 0. Accuracy: slice 2 called empty: 2/3.
    assert r["zeros"]["dice_volume_mean"] == pytest.approx((2 / 3 + 0) / 2)
    assert r["zeros"]["slice_accuracy"] == pytest.approx(2 / 3)
    assert r["zeros"]["dice_drop"] == pytest.approx(1 - 1 / 3)


def test_probe_outputs_are_the_model_run_on_the_replaced_latent():
    """eval_outputs' probes equal the model applied with z_BxD given: zeros,
    the batch's z rolled by one row, and a prior draw (not the encoded z)."""
    model = get_model("dlvae_cnn", features=4, levels=2, vae_features=4, vae_levels=2, specific_dim=2,
                      shared_dim=2, inference_label="unknown")
    prep = PrepConfig(image_size=16, n_init=1)
    variables = model.init({"params": jax.random.key(0)}, example_inputs(2, 16, 1), train=False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 16, 16, 1)).astype(np.uint8)
    batch = {"image_BxHxWxC": jnp.asarray(images), "mask_BxHxW": jnp.zeros((3, 16, 16), jnp.uint8),
             "index_B": jnp.arange(3), "valid_B": jnp.ones((3,), bool)}
    key = jax.random.key_data(jax.random.key(5))
    out = eval_outputs(variables, batch, model=model, prep=prep, eval_key=key, diagnostics=True)
    assert out["latent_mean_BxD"].shape == (3, 8) and out["latent_kl_BxD"].shape == (3, 8)
    assert bool(jnp.all(out["latent_kl_BxD"] >= 0))
    from dlvae_jax.train.step import prepare_inputs

    inputs = prepare_inputs(dict(batch, index_B=jnp.zeros((3,), jnp.int32)), jax.random.wrap_key_data(key), prep)
    inputs = {k: v for k, v in inputs.items() if k not in ("label_B", "mask_BxHxW")}
    encoded, _ = apply_model(model, variables, inputs, train=False)
    z = encoded["z_BxD"]
    np.testing.assert_allclose(out["latent_mean_BxD"], z, atol=1e-6)  # z is the label-free posterior mean
    for name, zp in (("zeros", jnp.zeros_like(z)), ("shuffle", jnp.roll(z, 1, axis=0))):
        ref, _ = apply_model(model, variables, dict(inputs, z_BxD=zp), train=False)
        np.testing.assert_allclose(out[f"probe_{name}_tumor_prob_B"], jax.nn.softmax(ref["logits_Bx2"])[:, 1],
                                   atol=1e-5)
        np.testing.assert_allclose(out[f"probe_{name}_prob_BxHxW"], jax.nn.sigmoid(ref["mask_logits_BxHxW"]),
                                   atol=1e-5)
    assert not np.allclose(out["probe_prior_prob_BxHxW"], out["prob_BxHxW"])
    # A model without a VAE latent returns only its predictions.
    unet = get_model("unet", features=4, levels=2)
    uvars = unet.init({"params": jax.random.key(0)}, example_inputs(2, 16, 1), train=False)
    assert set(eval_outputs(uvars, batch, model=unet, prep=prep, eval_key=key, diagnostics=True)) == {
        "prob_BxHxW", "tumor_prob_B"}


def test_dlvae_without_its_vae_has_no_vae_parameters_or_terms():
    model = get_model("dlvae_cnn", features=4, levels=2, vae_features=4, vae_levels=2, specific_dim=2,
                      shared_dim=2, use_vae=False)
    variables = model.init({"params": jax.random.key(0)}, example_inputs(2, 16, 1), train=False)
    assert set(variables["params"]) == {"cnn"}
    out = model.apply(variables, example_inputs(2, 16, 1), train=False)
    assert set(out) == {"logits_Bx2", "mask_logits_BxHxW", "z_BxD"}
    assert out["z_BxD"].shape == (2, 8) and not np.any(np.asarray(out["z_BxD"]))


# ------------------------------------------------------------ a short training


def _short_run(tmp_path, name, extra=()):
    cfg = configs.load("demo", ["train.steps=150", "train.eval_every=150", "train.checkpoint_every=150",
                                "loss.schedules.kl=linear:20", "data.image_size=32", "data.synth_patients=6",
                                "data.fractions=(0.5, 0.5, 0.0)", *extra])
    train(cfg, tmp_path / name, progress="none")
    rows = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1], [r for r in rows if r["kind"] == "train"][-1]


def test_short_training_makes_the_label_free_latent_carry_information(tmp_path):
    """With the VAE terms as a likelihood (the default) the label-free
    posterior has active units and a KL of several nats after 150 steps on the
    phantoms; with Eqs. 6-7 read literally (per-value mean of the squared
    error beside the KL in nats) it collapses to the prior: no active unit."""
    ev, tr = _short_run(tmp_path, "likelihood")
    assert ev["latent_active_units"] >= 1, ev
    assert ev["latent_kl_nats"] >= 5.0, ev
    assert tr["kl_free_nats"] >= 5.0, tr
    for name in PROBES:  # the probe is logged at every evaluation
        assert f"probe_{name}_dice_drop" in ev and f"probe_{name}_accuracy_drop" in ev

    ev_old, _ = _short_run(tmp_path, "literal", ["loss.reduction=mean", "loss.reconstruction_kind=l2"])
    assert ev_old["latent_active_units"] == 0, ev_old
    assert ev_old["latent_kl_nats"] < 1.0, ev_old
