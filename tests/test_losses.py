"""Loss terms against independent NumPy references and hand-computed values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlvae_jax import losses
from dlvae_jax.losses import LossConfig

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------- NumPy references


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_kl(means, logvars, free_bits=0.0):
    total = 0.0
    for m, lv in zip(means, logvars):
        per_dim = np.mean(0.5 * (m**2 + np.exp(lv) - 1.0 - lv), axis=0)
        total += np.sum(np.maximum(per_dim, free_bits))
    return total


def np_bce(logits, t):
    p = np_sigmoid(logits.astype(np.float64))
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def np_recon(logits, target, kind, reduction="mean"):
    if kind == "l2":
        err = (np_sigmoid(logits) - target) ** 2
    elif kind == "l1":
        err = np.abs(np_sigmoid(logits) - target)
    else:
        err = np_bce(logits, target)
    b, h, w, c = err.shape
    per_example = err.reshape(b, -1).sum(axis=1)
    scale = {"mean": 1.0 / (h * w * c), "sum": 1.0, "pixel": 1.0 / (h * w)}[reduction]
    return np.mean(per_example) * scale


def np_cosine(a, b):
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.mean(1 - cos)


def np_ce(logits, labels):
    logits = logits.astype(np.float64)
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return np.mean(logz - logits[np.arange(len(labels)), labels])


def np_dice_loss(logits, mask, smooth=1.0):
    p = np_sigmoid(logits)
    inter = np.sum(p * mask, axis=(1, 2))
    return np.mean(1 - (2 * inter + smooth) / (p.sum(axis=(1, 2)) + mask.sum(axis=(1, 2)) + smooth))


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------- terms


def test_kl_matches_numpy_and_hand_values():
    means = [RNG.normal(size=(3, 5)).astype(np.float32) for _ in range(4)]
    logvars = [RNG.normal(scale=0.5, size=(3, 5)).astype(np.float32) for _ in range(4)]
    close(losses.kl(means, logvars), np_kl(means, logvars))
    # Standard normal posterior: KL is exactly 0.
    zeros = [np.zeros((2, 3), np.float32)] * 4
    close(losses.kl(zeros, zeros), 0.0)
    # One latent, mean 1, logvar 0: 0.5 * 1 per dim, 3 dims -> 1.5 nats.
    close(losses.kl([np.ones((2, 3), np.float32)], [np.zeros((2, 3), np.float32)]), 1.5)


def test_kl_free_bits_floors_each_dimension():
    means = [RNG.normal(scale=0.3, size=(4, 6)).astype(np.float32) for _ in range(4)]
    logvars = [RNG.normal(scale=0.1, size=(4, 6)).astype(np.float32) for _ in range(4)]
    close(losses.kl(means, logvars, free_bits=0.05), np_kl(means, logvars, 0.05))
    # A collapsed posterior (KL 0) costs exactly free_bits per dimension.
    zeros = [np.zeros((2, 3), np.float32)] * 4
    close(losses.kl(zeros, zeros, free_bits=0.25), 4 * 3 * 0.25)
    # And no gradient flows through a floored dimension.
    g = jax.grad(lambda m: losses.kl([m], [jnp.zeros_like(m)], free_bits=10.0))(jnp.ones((2, 3)))
    close(g, np.zeros((2, 3)))


def test_kl_beta_warmup_is_linear_then_one():
    close(losses.kl_beta(0, 100), 0.0)
    close(losses.kl_beta(25, 100), 0.25)
    close(losses.kl_beta(100, 100), 1.0)
    close(losses.kl_beta(500, 100), 1.0)
    close(losses.kl_beta(0, 0), 1.0)


@pytest.mark.parametrize("kind", ["l2", "l1", "bce"])
def test_reconstruction_matches_numpy(kind):
    l1 = RNG.normal(size=(2, 4, 5, 3)).astype(np.float32)
    t1 = RNG.uniform(size=(2, 4, 5, 3)).astype(np.float32)
    l2 = RNG.normal(size=(2, 4, 5, 4)).astype(np.float32)
    t2 = np.eye(4, dtype=np.float32)[RNG.integers(0, 4, size=(2, 4, 5))]
    got = losses.reconstruction(l1, t1, l2, t2, kind)
    close(got, np_recon(l1, t1, kind) + np_recon(l2, t2, kind))


def test_reconstruction_hand_values():
    # Logit 0 -> reconstruction 0.5 everywhere; target 1: L2 = 0.25, L1 = 0.5, BCE = log 2.
    zeros, ones = np.zeros((1, 2, 2, 1), np.float32), np.ones((1, 2, 2, 1), np.float32)
    close(losses.reconstruction_view(zeros, ones, "l2"), 0.25)
    close(losses.reconstruction_view(zeros, ones, "l1"), 0.5)
    close(losses.reconstruction_view(zeros, ones, "bce"), math.log(2))
    with pytest.raises(ValueError, match="reconstruction kind"):
        losses.reconstruction_view(zeros, ones, "l3")


def test_bce_is_stable_for_large_logits():
    logits = np.array([[[[100.0], [-100.0]]]], np.float32)
    targets = np.array([[[[0.0], [1.0]]]], np.float32)
    close(losses.reconstruction_view(logits, targets, "bce"), 100.0, rtol=1e-6)


def test_cosine_matches_numpy_and_hand_values():
    a = RNG.normal(size=(5, 7)).astype(np.float32)
    b = RNG.normal(size=(5, 7)).astype(np.float32)
    close(losses.cosine(a, b), np_cosine(a, b))
    close(losses.cosine(a, 3.0 * a), 0.0, atol=1e-6)  # parallel
    close(losses.cosine(a, -a), 2.0)  # opposite
    close(losses.cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])), 1.0)  # orthogonal


def test_classification_matches_numpy_and_hand_values():
    logits = RNG.normal(size=(6, 2)).astype(np.float32) * 3
    labels = RNG.integers(0, 2, size=6)
    close(losses.classification(logits, labels), np_ce(logits, labels))
    close(losses.classification(np.zeros((3, 2), np.float32), np.array([0, 1, 1])), math.log(2))


def test_segmentation_matches_numpy():
    logits = RNG.normal(size=(3, 6, 6)).astype(np.float32) * 2
    mask = (RNG.uniform(size=(3, 6, 6)) > 0.7).astype(np.float32)
    mask[0] = 0.0  # a tumor-free slice
    close(losses.soft_dice_loss(logits, mask), np_dice_loss(logits, mask))
    close(losses.pixel_bce(logits, mask), np.mean(np_bce(logits, mask)))
    _, logs = losses.total_loss({"logits_Bx2": np.zeros((3, 2), np.float32), "mask_logits_BxHxW": logits},
                                {"label_B": np.zeros(3, np.int32), "mask_BxHxW": mask},
                                LossConfig.make(seg_dice_weight=0.3, seg_bce_weight=2.0))
    close(logs["segmentation"], 0.3 * np_dice_loss(logits, mask) + 2.0 * np.mean(np_bce(logits, mask)))


def test_dice_hand_values():
    # Confident empty prediction on an empty mask: Dice (0 + 1) / (~0 + 0 + 1) -> loss ~0.
    empty = np.zeros((1, 4, 4), np.float32)
    close(losses.soft_dice_loss(np.full((1, 4, 4), -50.0, np.float32), empty), 0.0, atol=1e-6)
    # Perfect confident prediction of a 4-pixel mask: (8 + 1) / (4 + 4 + 1) = 1 -> loss 0.
    mask = np.zeros((1, 4, 4), np.float32)
    mask[0, :2, :2] = 1
    close(losses.soft_dice_loss(np.where(mask > 0, 50.0, -50.0), mask), 0.0, atol=1e-6)
    # Logit 0 everywhere (p = 0.5), same mask: 1 - (4 + 1) / (8 + 4 + 1) = 8 / 13.
    close(losses.soft_dice_loss(np.zeros((1, 4, 4), np.float32), mask), 8 / 13)


def test_batch_dice_pools_the_batch_and_skips_padding():
    # Slice 0: the 4-pixel mask above predicted at p = 0.5; slice 1: empty mask,
    # confident empty prediction; slice 2: padding (valid false), anything.
    mask = np.zeros((3, 4, 4), np.float32)
    mask[0, :2, :2] = 1
    mask[2] = 1
    logits = np.full((3, 4, 4), -50.0, np.float32)
    logits[0] = 0.0
    logits[2] = 50.0
    valid = np.array([True, True, False])
    # Pooled over slices 0 and 1: 1 - (2 * 2 + 1) / (8 + 4 + 1) = 8 / 13, the
    # tumor-free slice adding nothing; per slice it would be (8/13 + 0) / 2.
    close(losses.soft_dice_loss(logits, mask, 1.0, valid, "batch"), 8 / 13, atol=1e-6)
    close(losses.soft_dice_loss(logits, mask, 1.0, valid, "slice"), 4 / 13, atol=1e-6)
    _, logs = losses.total_loss({"mask_logits_BxHxW": logits[:2]}, {"mask_BxHxW": mask[:2]},
                                LossConfig.make(dice_kind="batch", seg_bce_weight=0.0))
    close(logs["segmentation_dice"], 8 / 13, atol=1e-6)
    with pytest.raises(ValueError, match="dice_kind"):
        LossConfig.make(dice_kind="volume")


# ------------------------------------------------------------ total_loss


def _fake_vae_outputs(b=2, h=4, w=4, c=3, k=4, d=3):
    f = lambda *s: jnp.asarray(RNG.normal(size=s).astype(np.float32))
    names = ("pp", "pv", "qq", "qv")
    return {
        "logits_Bx2": f(b, 2),
        "mask_logits_BxHxW": f(b, h, w),
        "latent_logits_Bx2": f(b, 2),
        "latent_means": {n: f(b, d) for n in names},
        "latent_logvars": {n: 0.3 * f(b, d) for n in names},
        "z_pv_BxD": f(b, d),
        "z_qv_BxD": f(b, d),
        "recon_b1_logits_BxHxWxC": f(b, h, w, c),
        "recon_b2_logits_BxHxWxK": f(b, h, w, k),
    }


def _fake_batch(b=2, h=4, w=4, c=3, k=4):
    return {
        "image_BxHxWxC": jnp.asarray(RNG.uniform(size=(b, h, w, c)).astype(np.float32)),
        "clusters_BxHxW": jnp.asarray(RNG.integers(0, k, size=(b, h, w)).astype(np.int32)),
        "label_B": jnp.asarray(np.arange(b, dtype=np.int32) % 2),
        "mask_BxHxW": jnp.asarray((RNG.uniform(size=(b, h, w)) > 0.5).astype(np.float32)),
    }


def _np_terms(out, batch, kind="l2", free_bits=0.0, reduction="pixel"):
    o = jax.tree_util.tree_map(np.asarray, out)
    bt = jax.tree_util.tree_map(np.asarray, batch)
    names = ("pp", "pv", "qq", "qv")
    onehot = np.eye(o["recon_b2_logits_BxHxWxK"].shape[-1])[bt["clusters_BxHxW"]]
    h, w = bt["image_BxHxWxC"].shape[1:3]
    kl_scale = 1.0 / (h * w) if reduction == "pixel" else 1.0
    return {
        "kl": kl_scale * np_kl([o["latent_means"][n] for n in names], [o["latent_logvars"][n] for n in names],
                               free_bits),
        "reconstruction": np_recon(o["recon_b1_logits_BxHxWxC"], bt["image_BxHxWxC"], kind, reduction)
        + np_recon(o["recon_b2_logits_BxHxWxK"], onehot, kind, reduction),
        "cosine": np_cosine(o["latent_means"]["pv"], o["latent_means"]["qv"]),
        "latent_classification": np_ce(o["latent_logits_Bx2"], bt["label_B"]),
        "classification": np_ce(o["logits_Bx2"], bt["label_B"]),
        "segmentation": np_dice_loss(o["mask_logits_BxHxW"], bt["mask_BxHxW"])
        + np.mean(np_bce(o["mask_logits_BxHxW"], bt["mask_BxHxW"])),
    }


def test_total_loss_matches_weighted_numpy_sum():
    out, batch = _fake_vae_outputs(), _fake_batch()
    cfg = LossConfig.make(
        kl=0.5, reconstruction=2.0, cosine=0.1, latent_classification=0.7, classification=1.3, segmentation=3.0,
        free_bits=0.01, reconstruction_kind="bce", kl_warmup_steps=10,
    )
    total, logs = losses.total_loss(out, batch, cfg, step=4)
    ref = _np_terms(out, batch, "bce", 0.01)
    for name, value in ref.items():
        close(logs[name], value, rtol=1e-5)
    beta = 0.4
    expected = (
        0.5 * beta * ref["kl"] + 2.0 * ref["reconstruction"] + 0.1 * ref["cosine"]
        + 0.7 * ref["latent_classification"] + 1.3 * ref["classification"] + 3.0 * ref["segmentation"]
    )
    close(total, expected, rtol=1e-5)
    close(logs["total"], expected, rtol=1e-5)
    close(logs["kl_beta"], beta)


def test_kl_adds_the_label_free_posterior_when_present():
    """dlvae_cnn's CNN reads the label-free posterior; its KL joins Eq. 6's."""
    out, batch = _fake_vae_outputs(), _fake_batch()
    names = ("pp", "pv", "qq", "qv")
    free_means = {n: jnp.asarray(RNG.normal(size=(2, 3)).astype(np.float32)) for n in names}
    free_logvars = {n: jnp.asarray(0.5 * RNG.normal(size=(2, 3)).astype(np.float32)) for n in names}
    _, logs = losses.total_loss(dict(out, free_latent_means=free_means, free_latent_logvars=free_logvars), batch,
                                LossConfig.make(free_bits=0.02))
    o = jax.tree_util.tree_map(np.asarray, out)
    expected = np_kl([o["latent_means"][n] for n in names], [o["latent_logvars"][n] for n in names], 0.02) + np_kl(
        [np.asarray(free_means[n]) for n in names], [np.asarray(free_logvars[n]) for n in names], 0.02)
    close(logs["kl_nats"], expected, rtol=1e-5)


def test_invalid_rows_are_left_out_of_every_term():
    """Evaluation padding (valid_B False) counts nowhere: the logs equal the
    NumPy references on the valid rows alone, whatever the padding holds."""
    out, batch = _fake_vae_outputs(b=5), _fake_batch(b=5)
    valid = np.array([True, False, True, True, False])
    cfg = LossConfig.make(free_bits=0.01, reconstruction_kind="l1")
    total, logs = losses.total_loss(out, dict(batch, valid_B=jnp.asarray(valid)), cfg)
    keep = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x)[valid], tree)
    ref = _np_terms(keep(out), keep(batch), "l1", 0.01)
    for name, value in ref.items():
        close(logs[name], value, rtol=1e-5)
    close(total, sum(ref.values()), rtol=1e-5)


def test_total_loss_skips_terms_a_model_lacks():
    out, batch = _fake_vae_outputs(), _fake_batch()
    baseline_out = {"logits_Bx2": out["logits_Bx2"]}
    total, logs = losses.total_loss(baseline_out, batch, LossConfig.make())
    assert set(logs) == {"classification", "total"}
    close(total, np_ce(np.asarray(out["logits_Bx2"]), np.asarray(batch["label_B"])))
    # Segmentation is skipped when the batch has no mask.
    _, logs = losses.total_loss({"logits_Bx2": out["logits_Bx2"], "mask_logits_BxHxW": out["mask_logits_BxHxW"]},
                                dict(batch, mask_BxHxW=None), LossConfig.make())
    assert "segmentation" not in logs and "classification" in logs


def test_python_zero_weight_drops_a_nan_term_from_the_total():
    out, batch = _fake_vae_outputs(), _fake_batch()
    out["latent_means"] = dict(out["latent_means"], pv=out["latent_means"]["pv"].at[0, 0].set(jnp.nan))
    # The NaN mean reaches the KL too: both terms are switched off.
    total, logs = losses.total_loss(out, batch, LossConfig.make(cosine=0.0, kl=0.0))
    assert np.isnan(float(logs["cosine"])) and np.isnan(float(logs["kl"]))  # still logged
    assert np.isfinite(float(total))


def test_zero_weight_removes_gradient_wrt_outputs():
    """Gradient of the total w.r.t. the outputs: with a term's weight 0 it equals
    the gradient of the other weighted terms alone (independent NumPy-free check
    via the pure term functions), for every term, under jit with traced weights."""
    out, batch = _fake_vae_outputs(), _fake_batch()

    @jax.jit
    def grad_total(out, cfg):
        return jax.grad(lambda o: losses.total_loss(o, batch, cfg)[0])(out)

    full = grad_total(out, LossConfig.make())
    for term in losses.TERMS:
        without = grad_total(out, LossConfig.make(**{term: 0.0}))
        only = grad_total(out, LossConfig.make(**{t: (1.0 if t == term else 0.0) for t in losses.TERMS}))
        # The term does contribute when its weight is 1 ...
        assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(only)) > 1e-4, term
        # ... and with weight 0 exactly its contribution is gone.
        for f, w, o in zip(*(jax.tree_util.tree_leaves(t) for t in (full, without, only))):
            close(w, f - o, rtol=1e-4, atol=1e-6)


def test_loss_config_validates_and_is_a_pytree():
    with pytest.raises(ValueError, match="reconstruction_kind"):
        LossConfig.make(reconstruction_kind="l3")
    with pytest.raises(ValueError, match="schedule"):
        LossConfig.make(kl_warmup_steps=-1)
    with pytest.raises(ValueError, match="reduction"):
        LossConfig.make(reduction="median")
    with pytest.raises(ValueError, match="no_such_term"):
        LossConfig.make(no_such_term=1.0)
    leaves, treedef = jax.tree_util.tree_flatten(LossConfig.make(reconstruction_kind="l1", kl_warmup_steps=7))
    assert len(leaves) == 11  # six weights, five float options; kind, reduction and schedules are static
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.reconstruction_kind == "l1" and rebuilt.schedule("kl") == "linear:7"
    # Stacked configs vmap: one loss per variant.
    out, batch = _fake_vae_outputs(), _fake_batch()
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), LossConfig.make(cosine=0.0), LossConfig.make(cosine=1.0))
    totals = jax.vmap(lambda c: losses.total_loss(out, batch, c)[0])(stacked)
    close(totals[1] - totals[0], np_cosine(np.asarray(out["latent_means"]["pv"]), np.asarray(out["latent_means"]["qv"])),
          rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "pixel"])
def test_reductions_scale_reconstruction_and_kl_as_documented(reduction):
    """'sum' is the ELBO in nats per slice; 'pixel' the same divided by H*W;
    'mean' the per-value mean beside the KL in nats (hand-written NumPy)."""
    out, batch = _fake_vae_outputs(h=6, w=5), _fake_batch(h=6, w=5)
    _, logs = losses.total_loss(out, batch, LossConfig.make(reconstruction_kind="bce", reduction=reduction))
    ref = _np_terms(out, batch, "bce", 0.0, reduction)
    close(logs["reconstruction"], ref["reconstruction"], rtol=1e-5)
    close(logs["kl"], ref["kl"], rtol=1e-5)
    close(logs["kl_nats"], ref["kl"] * (30 if reduction == "pixel" else 1), rtol=1e-5)


def test_label_free_posterior_is_reconstructed_and_counted():
    """The label-free posterior's decoded views add their own reconstruction
    term, and its plain KL is logged as kl_free_nats."""
    out, batch = _fake_vae_outputs(), _fake_batch()
    free = _fake_vae_outputs()
    both = dict(out, free_latent_means=free["latent_means"], free_latent_logvars=free["latent_logvars"],
                free_recon_b1_logits_BxHxWxC=free["recon_b1_logits_BxHxWxC"],
                free_recon_b2_logits_BxHxWxK=free["recon_b2_logits_BxHxWxK"])
    cfg = LossConfig.make(reduction="sum")
    _, logs = losses.total_loss(both, batch, cfg)
    ref, ref_free = _np_terms(out, batch, "bce", 0.0, "sum"), _np_terms(free, batch, "bce", 0.0, "sum")
    close(logs["reconstruction"], ref["reconstruction"] + ref_free["reconstruction"], rtol=1e-5)
    close(logs["kl"], ref["kl"] + ref_free["kl"], rtol=1e-5)
    close(logs["kl_free_nats"], ref_free["kl"], rtol=1e-5)
    close(logs["cosine"], (ref["cosine"] + ref_free["cosine"]) / 2, rtol=1e-5)


def test_schedules_by_hand():
    f = lambda spec, step: float(losses.schedule_factor(spec, step))
    assert f("constant", 123) == 1.0
    assert f("linear:100", 0) == 0.0 and f("linear:100", 25) == 0.25 and f("linear:100", 400) == 1.0
    assert f("linear:0", 0) == 1.0
    # cycles of 100 steps, rising over the first half: 0, 0.5, 1 (step 50..99), 0 again at 100
    np.testing.assert_allclose([f("cyclical:100", s) for s in (0, 25, 50, 99, 100, 130)],
                               [0.0, 0.5, 1.0, 1.0, 0.0, 0.6], rtol=1e-6)
    close(f("cyclical:10:1", 5), 0.5)
    for bad in ("linear", "linear:-1", "cyclical:0", "cyclical:10:0", "cosine:3", "linear:x"):
        with pytest.raises(ValueError, match="schedule"):
            losses.parse_schedule(bad)
    # A scheduled term is multiplied by its factor and the factor is logged.
    out, batch = _fake_vae_outputs(), _fake_batch()
    cfg = LossConfig.make(schedules={"cosine": "linear:10"})
    t0, logs = losses.total_loss(out, batch, cfg, step=3)
    t1, _ = losses.total_loss(out, batch, cfg.set(cosine=0.0), step=3)
    close(logs["cosine_beta"], 0.3)
    close(t0 - t1, 0.3 * float(logs["cosine"]), rtol=1e-4)


def test_a_new_term_is_one_function_and_one_weight():
    """Registering a term and giving it a weight adds weight * value to the
    total, logged under its name; without a weight it is not computed."""
    name = "test_mean_abs_logit"

    @losses.term(name)
    def _mean_abs_logit(outputs, batch, cfg, ctx):
        return jnp.mean(jnp.abs(outputs["logits_Bx2"]))

    try:
        out, batch = _fake_vae_outputs(), _fake_batch()
        base_total, base_logs = losses.total_loss(out, batch, LossConfig.make())
        assert name not in base_logs
        total, logs = losses.total_loss(out, batch, LossConfig.make(**{name: 0.5}))
        expected = np.mean(np.abs(np.asarray(out["logits_Bx2"])))
        close(logs[name], expected)
        close(total - base_total, 0.5 * expected, rtol=1e-4)
    finally:
        del losses.TERMS[name]


def test_old_run_configs_keep_their_meaning():
    """A run's config.json written with flat weights (before terms were declared
    once) is read with the per-value mean it was trained with."""
    old = dict(kl=0.5, reconstruction=1.0, cosine=1.0, latent_classification=1.0, classification=1.0,
               segmentation=1.0, free_bits=0.1, seg_dice_weight=1.0, seg_bce_weight=1.0, dice_smooth=1.0,
               reconstruction_kind="l2", kl_warmup_steps=300)
    cfg = losses.from_config(old)
    assert cfg.reduction == "mean" and cfg.reconstruction_kind == "l2" and cfg.kl == 0.5
    assert cfg.schedule("kl") == "linear:300" and cfg.free_bits == 0.1


def test_tversky_weights_false_negatives_by_hand():
    # The 4-pixel mask predicted at p = 0.5 on all 16 pixels: TP 2, FP 6, FN 2.
    # b = 0.7: 1 - (2 * 2 + 1) / (2 * 2 + 2 * 0.3 * 6 + 2 * 0.7 * 2 + 1) = 6.4 / 11.4.
    mask = np.zeros((1, 4, 4), np.float32)
    mask[0, :2, :2] = 1
    half = np.zeros((1, 4, 4), np.float32)
    close(losses.soft_dice_loss(half, mask, fn_weight=0.7), 6.4 / 11.4, atol=1e-6)
    close(losses.soft_dice_loss(half, mask, fn_weight=0.5), 8 / 13, atol=1e-6)  # b = 0.5 is Dice
    _, logs = losses.total_loss({"mask_logits_BxHxW": half}, {"mask_BxHxW": mask},
                                LossConfig.make(dice_fn_weight=0.7, seg_bce_weight=0.0))
    close(logs["segmentation_dice"], 6.4 / 11.4, atol=1e-6)
    # Pooled over a batch (a confident empty slice and a padding row add nothing): the same 6.4 / 11.4.
    batch_mask = np.concatenate([mask, np.zeros_like(mask), np.ones_like(mask)])
    batch_logits = np.concatenate([half, np.full_like(half, -50.0), np.full_like(half, 50.0)])
    close(losses.soft_dice_loss(batch_logits, batch_mask, 1.0, np.array([True, True, False]), "batch", None, 0.7),
          6.4 / 11.4, atol=1e-6)
    # Missing 2 tumor pixels against covering 2 extra ones: b > 0.5 makes the miss cost relatively more.
    under = np.where(mask > 0, 50.0, -50.0).astype(np.float32)
    under[0, 1, :2] = -50.0          # 2 of the 4 tumor pixels missed
    over = np.where(mask > 0, 50.0, -50.0).astype(np.float32)
    over[0, 2, :2] = 50.0            # 2 extra pixels
    # Dice: under 1 - 5/7, over 1 - 9/11; b = 0.7: under 1 - 5/7.8, over 1 - 9/10.2.
    close(losses.soft_dice_loss(under, mask), 2 / 7, atol=1e-6)
    close(losses.soft_dice_loss(over, mask), 2 / 11, atol=1e-6)
    close(losses.soft_dice_loss(under, mask, fn_weight=0.7), 2.8 / 7.8, atol=1e-6)
    close(losses.soft_dice_loss(over, mask, fn_weight=0.7), 1.2 / 10.2, atol=1e-6)
