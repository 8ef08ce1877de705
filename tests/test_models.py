"""Models: shapes, finite gradients, determinism, label resolution, FiLM
conditioning, loss-weight gradients, mixed precision, registry and CLI.

Tiny widths at 32x32 keep compiles short; jitted functions are built once per
model in module-scoped fixtures and reused.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlvae_jax import losses
from dlvae_jax.cli import main as cli_main
from dlvae_jax.errors import DlvaeError
from dlvae_jax.losses import LossConfig
from dlvae_jax.models import (
    MODEL_NAMES,
    apply_model,
    count_params,
    example_inputs,
    forward_flops,
    get_model,
    init_variables,
)

B, S, C, K = 2, 32, 3, 4
TINY = {
    "dlvae_cnn": dict(specific_dim=4, shared_dim=4, vae_features=4, vae_levels=2, features=4, levels=2),
    "cnn": dict(features=4, blocks=2, hidden=8),
    "vgg16": dict(features=4, hidden=8),
    "dcnn": dict(features=4, blocks_per_stage=1),
    "unet": dict(features=4, levels=2),
}
Z_DIM = 2 * (4 + 4)  # dlvae_cnn tiny: four latents of 4

# Test programs are compiled without LLVM optimization: compiling, not running,
# dominates on CPU (about 2.5x faster overall); the math is unchanged.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image_BxHxWxC": jnp.asarray(rng.uniform(size=(B, S, S, C)).astype(np.float32)),
        "clusters_BxHxW": jnp.asarray(rng.integers(0, K, size=(B, S, S)).astype(np.int32)),
        "label_B": jnp.asarray(np.array([0, 1], np.int32)),
        "mask_BxHxW": jnp.asarray((rng.uniform(size=(B, S, S)) > 0.8).astype(np.float32)),
    }


class Compiled:
    """A model with its variables and its jitted train step pieces."""

    def __init__(self, name):
        self.name = name
        self.model = get_model(name, **TINY[name])
        self.batch = make_batch()
        self.variables = init_variables(self.model, jax.random.key(0), self.batch)
        model = self.model

        def loss_fn(params, variables, batch, key, cfg):
            outputs, new_vars = apply_model(model, {**variables, "params": params}, batch, train=True, key=key)
            total, logs = losses.total_loss(outputs, batch, cfg, step=0)
            return total, (outputs, logs, new_vars)

        self.train_step = jit(jax.value_and_grad(loss_fn, has_aux=True))
        self.infer = jit(lambda variables, batch: apply_model(model, variables, batch, train=False)[0])

    def step(self, key, cfg=LossConfig.make()):
        return self.train_step(self.variables["params"], self.variables, self.batch, key, cfg)


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Compiled(name)
        return cache[name]

    return get


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes_and_dtypes(compiled, name):
    m = compiled(name)
    (_, (out, logs, _)), _ = m.step(jax.random.key(1))
    chex.assert_shape(out["logits_Bx2"], (B, 2))
    chex.assert_type(out["logits_Bx2"], jnp.float32)
    has_mask = name in ("dlvae_cnn", "unet")
    assert ("mask_logits_BxHxW" in out) == has_mask
    if has_mask:
        chex.assert_shape(out["mask_logits_BxHxW"], (B, S, S))
        assert "segmentation" in logs
    if name == "dlvae_cnn":
        chex.assert_shape(list(out["latent_means"].values()) + list(out["latent_logvars"].values()), (B, 4))
        chex.assert_shape([out["z_pv_BxD"], out["z_qv_BxD"]], (B, 4))
        chex.assert_shape(out["z_BxD"], (B, Z_DIM))
        chex.assert_shape(out["recon_b1_logits_BxHxWxC"], (B, S, S, C))
        chex.assert_shape(out["recon_b2_logits_BxHxWxK"], (B, S, S, K))
        chex.assert_shape([out["latent_logits_Bx2"]], (B, 2))
        chex.assert_shape(out["resolved_label_Bx3"], (B, 3))
        assert set(logs) >= set(losses.TERMS)
    else:
        assert set(logs) & set(losses.TERMS) <= {"classification", "segmentation"}


# --------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_total_loss_gradients_are_finite_and_nonzero(compiled, name):
    m = compiled(name)
    (total, (_, logs, new_vars)), grads = m.step(jax.random.key(2))
    assert np.isfinite(float(total)) and float(total) > 0
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    chex.assert_trees_all_equal_shapes(grads, m.variables["params"])
    if "batch_stats" in m.variables:  # training updates the running statistics
        changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), m.variables["batch_stats"],
                                         new_vars["batch_stats"])
        assert any(jax.tree_util.tree_leaves(changed))


def test_batch_norm_uses_batch_statistics_in_training_only(compiled):
    """Inference normalizes with the running statistics, so a slice's outputs do
    not depend on its batch neighbours; training normalizes with the batch's own
    statistics, so they do."""
    m = compiled("dlvae_cnn")
    other = dict(m.batch, image_BxHxWxC=m.batch["image_BxHxWxC"].at[1].set(1.0 - m.batch["image_BxHxWxC"][1]))
    a, b = m.infer(m.variables, m.batch), m.infer(m.variables, other)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[0], a), jax.tree_util.tree_map(lambda x: x[0], b),
                                rtol=1e-5, atol=1e-6)
    key = jax.random.key(9)
    (_, (ta, _, _)), _ = m.train_step(m.variables["params"], m.variables, m.batch, key, LossConfig.make())
    (_, (tb, _, _)), _ = m.train_step(m.variables["params"], m.variables, other, key, LossConfig.make())
    assert not np.allclose(ta["mask_logits_BxHxW"][0], tb["mask_logits_BxHxW"][0])


# ------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_key_same_outputs(compiled, name):
    m = compiled(name)
    (t1, (o1, _, _)), g1 = m.step(jax.random.key(3))
    (t2, (o2, _, _)), g2 = m.step(jax.random.key(3))
    chex.assert_trees_all_equal(o1, o2)
    chex.assert_trees_all_equal(g1, g2)


def test_init_is_keyed():
    model, batch = get_model("cnn", **TINY["cnn"]), make_batch()
    a, b = (init_variables(model, jax.random.key(k), batch) for k in (0, 0))
    chex.assert_trees_all_equal(a, b)
    c = init_variables(model, jax.random.key(1), batch)
    assert not np.allclose(a["params"]["Dense_0"]["kernel"], c["params"]["Dense_0"]["kernel"])


def test_different_keys_change_the_vae_samples(compiled):
    m = compiled("dlvae_cnn")
    (_, (o1, _, _)), _ = m.step(jax.random.key(4))
    (_, (o2, _, _)), _ = m.step(jax.random.key(5))
    assert not np.allclose(o1["z_pv_BxD"], o2["z_pv_BxD"])


def test_inference_is_deterministic_and_uses_means(compiled):
    m = compiled("dlvae_cnn")
    batch = dict(m.batch, label_B=None)
    o1, o2 = m.infer(m.variables, batch), m.infer(m.variables, batch)
    chex.assert_trees_all_equal(o1, o2)
    chex.assert_trees_all_close(o1["z_pv_BxD"], o1["latent_means"]["pv"])


# ---------------------------------------------------- loss weights -> grads


def test_zero_loss_weight_removes_that_terms_gradient(compiled):
    """For every term t, on the dlvae_cnn parameters: grad(total, w_t = 0) equals
    grad(total, all weights 1) - grad(only w_t = 1), and grad(only t) is not
    zero, so the term does contribute until its weight is set to 0. The
    weights are traced (LossConfig is a pytree), so one compile serves all."""
    m = compiled("dlvae_cnn")
    key = jax.random.key(6)
    grad = lambda cfg: m.step(key, cfg)[1]
    full = grad(LossConfig.make())
    for term in losses.TERMS:
        without = grad(LossConfig.make(**{term: 0.0}))
        only = grad(LossConfig.make(**{t: float(t == term) for t in losses.TERMS}))
        norm_only = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(only))))
        assert norm_only > 1e-6, term
        diff = jax.tree_util.tree_map(lambda f, w, o: f - o - w, full, without, only)
        scale = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(full))))
        err = float(jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree_util.tree_leaves(diff))))
        assert err <= 1e-4 * scale + 1e-6, (term, err, scale)
    # All weights 0: no gradient at all.
    zero = grad(LossConfig.make(**{t: 0.0 for t in losses.TERMS}))
    assert all(bool(jnp.all(g == 0)) for g in jax.tree_util.tree_leaves(zero))


# ---------------------------------------------- conditioning and the label


def test_changing_the_latent_changes_the_cnn_outputs(compiled):
    m = compiled("dlvae_cnn")
    rng = np.random.default_rng(7)
    z_a = jnp.asarray(rng.normal(size=(B, Z_DIM)).astype(np.float32))
    z_b = jnp.asarray(rng.normal(size=(B, Z_DIM)).astype(np.float32))
    oa = m.infer(m.variables, dict(m.batch, z_BxD=z_a))
    ob = m.infer(m.variables, dict(m.batch, z_BxD=z_b))
    oa2 = m.infer(m.variables, dict(m.batch, z_BxD=z_a))
    chex.assert_trees_all_equal(oa["logits_Bx2"], oa2["logits_Bx2"])
    assert float(jnp.max(jnp.abs(oa["logits_Bx2"] - ob["logits_Bx2"]))) > 1e-4
    assert float(jnp.max(jnp.abs(oa["mask_logits_BxHxW"] - ob["mask_logits_BxHxW"]))) > 1e-4
    # In the label-conditioned variant the label given to the encoder moves the latent too.
    legacy = m.model.clone(cnn_condition="label")
    infer = jit(lambda v, x: apply_model(legacy, v, x, train=False)[0])
    o0 = infer(m.variables, dict(m.batch, condition_label_B=jnp.array([0, 0])))
    o1 = infer(m.variables, dict(m.batch, condition_label_B=jnp.array([1, 1])))
    assert not np.allclose(o0["z_BxD"], o1["z_BxD"])
    assert not np.allclose(o0["logits_Bx2"], o1["logits_Bx2"])


def test_the_cnn_cannot_read_the_training_label(compiled):
    """The label shortcut: if the training label reaches the CNN (through z), the
    network can learn to read it instead of the image and then fails on every
    label-free slice. The default model's class and mask logits in training
    must not depend on the true label (same keys, label flipped); the
    label-conditioned variant's do, which is what this test guards against."""
    m = compiled("dlvae_cnn")
    flipped = dict(m.batch, label_B=1 - m.batch["label_B"])
    for model, leaks in ((m.model, False), (m.model.clone(cnn_condition="label", label_dropout=0.0), True)):
        run = jit(lambda v, x, model=model: apply_model(model, v, x, train=True, key=jax.random.key(3))[0])
        a, b = run(m.variables, m.batch), run(m.variables, flipped)
        for name in ("logits_Bx2", "mask_logits_BxHxW"):
            same = np.allclose(a[name], b[name], atol=1e-6)
            assert same != leaks, (model.cnn_condition, name)
        # The VAE part stays conditional on the label either way.
        assert not np.allclose(a["recon_b1_logits_BxHxWxC"], b["recon_b1_logits_BxHxWxC"])


@pytest.fixture(scope="module")
def inference_modes(compiled):
    m = compiled("dlvae_cnn")
    batch = dict(m.batch, label_B=None)
    out = {}
    for mode in ("unknown", "predicted", "marginal"):
        model = m.model.clone(inference_label=mode, cnn_condition="label")
        out[mode] = jit(lambda v, x, model=model: apply_model(model, v, x, train=False)[0])(m.variables, batch)
    return m, out


def test_inference_without_label_runs_in_every_mode(inference_modes):
    _, out = inference_modes
    for mode, o in out.items():
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(o)), mode
        chex.assert_shape(o["logits_Bx2"], (B, 2))
        chex.assert_shape(o["mask_logits_BxHxW"], (B, S, S))


def test_unknown_mode_uses_the_unknown_label_state(inference_modes):
    _, out = inference_modes
    np.testing.assert_array_equal(out["unknown"]["resolved_label_Bx3"], np.tile([0, 0, 1], (B, 1)))


def test_predicted_mode_reencodes_with_the_predicted_label(inference_modes):
    """'predicted' = pass 1 with the unknown label (exactly the 'unknown' mode's
    outputs), argmax, then the label-given path with that label."""
    m, out = inference_modes
    pred_B = jnp.argmax(out["unknown"]["logits_Bx2"], axis=-1)
    np.testing.assert_array_equal(out["predicted"]["resolved_label_Bx3"], np.eye(3)[np.asarray(pred_B)])
    legacy = m.model.clone(cnn_condition="label")
    given = jit(lambda v, x: apply_model(legacy, v, x, train=False)[0])(m.variables, dict(m.batch, condition_label_B=pred_B))
    chex.assert_trees_all_close(out["predicted"], given, rtol=1e-5, atol=1e-6)


def test_marginal_mode_mixes_latents_by_pass_one_probabilities(inference_modes):
    m, out = inference_modes
    p_Bx2 = jax.nn.softmax(out["unknown"]["logits_Bx2"], axis=-1)
    chex.assert_trees_all_close(out["marginal"]["resolved_label_Bx3"][:, :2], p_Bx2, rtol=1e-5)
    legacy = m.model.clone(cnn_condition="label")
    infer = jit(lambda v, x: apply_model(legacy, v, x, train=False)[0])
    z0 = infer(m.variables, dict(m.batch, condition_label_B=jnp.zeros(B, jnp.int32)))["z_BxD"]
    z1 = infer(m.variables, dict(m.batch, condition_label_B=jnp.ones(B, jnp.int32)))["z_BxD"]
    chex.assert_trees_all_close(out["marginal"]["z_BxD"], p_Bx2[:, :1] * z0 + p_Bx2[:, 1:] * z1, rtol=1e-5, atol=1e-6)


def test_inference_never_reads_the_target_label(inference_modes):
    """An evaluation batch carries `label_B` for the loss; at inference it must
    not reach the encoders: true labels, flipped labels and no labels give the
    same outputs (the default 'predicted' mode)."""
    m, out = inference_modes
    true = m.infer(m.variables, m.batch)
    flipped = m.infer(m.variables, dict(m.batch, label_B=1 - m.batch["label_B"]))
    chex.assert_trees_all_equal(true, flipped)
    chex.assert_trees_all_close(true, m.infer(m.variables, dict(m.batch, label_B=None)), rtol=1e-5, atol=1e-6)


def test_label_dropout_trains_the_unknown_path(compiled):
    m = compiled("dlvae_cnn")
    model = m.model.clone(label_dropout=1.0)
    out, _ = jit(lambda v, b: apply_model(model, v, b, train=True, key=jax.random.key(8)))(m.variables, m.batch)
    np.testing.assert_array_equal(out["resolved_label_Bx3"], np.tile([0, 0, 1], (B, 1)))


# ---------------------------------------------------------- mixed precision


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = get_model("unet", dtype="bfloat16", **TINY["unet"])
    batch = make_batch()
    variables = init_variables(model, jax.random.key(0), batch)
    assert {x.dtype for x in jax.tree_util.tree_leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    fn = jit(lambda v, b: apply_model(model, v, b, train=True, key=jax.random.key(1)))
    out, _ = fn(variables, batch)
    chex.assert_type([out["logits_Bx2"], out["mask_logits_BxHxW"]], jnp.float32)
    # bf16 compute stays close to float32 compute with the same parameters.
    out32, _ = jit(lambda v, b: apply_model(model.clone(dtype=jnp.float32), v, b, train=True))(variables, batch)
    assert float(jnp.max(jnp.abs(out["mask_logits_BxHxW"] - out32["mask_logits_BxHxW"]))) < 0.25
    # The computation really is bf16: some conv runs in bfloat16 in the lowered program.
    hlo = jax.jit(lambda v, b: apply_model(model, v, b, train=False)[0]).lower(variables, batch).as_text()
    assert "bf16" in hlo


# --------------------------------------------------- registry, counts, CLI


def test_registry_errors_name_the_options():
    with pytest.raises(DlvaeError, match="known models: dlvae_cnn, cnn, vgg16, dcnn, unet"):
        get_model("resnet")
    with pytest.raises(DlvaeError, match="no option"):
        get_model("unet", widht=3)
    with pytest.raises(DlvaeError, match="dtype"):
        get_model("unet", dtype="float8")


def test_param_count_and_flops_match_hand_computation():
    """cnn with features 4, 2 blocks, hidden 8 on 32x32x3 (no norm):
    conv 3x3x3->4 (+bias), conv 3x3x4->8 (+bias), Dense 8*8*8->8, Dense 8->2."""
    model = get_model("cnn", features=4, blocks=2, hidden=8)
    inputs = example_inputs(1, 32, 3)
    variables = init_variables(model, jax.random.key(0), inputs)
    expected = (27 * 4 + 4) + (36 * 8 + 8) + (512 * 8 + 8) + (8 * 2 + 2)
    assert count_params(variables) == expected
    # XLA counts only the taps that fall inside the image: a 3x3 SAME conv on
    # n x n has (3n - 2)^2 valid (tap, position) pairs per channel pair.
    valid = lambda n: (3 * n - 2) ** 2
    macs = valid(32) * 3 * 4 + valid(16) * 4 * 8 + 512 * 8 + 8 * 2
    flops = forward_flops(model, variables, inputs)
    # 2 FLOPs per multiply-add plus the elementwise ops (bias, ReLU, pooling).
    assert 2 * macs <= flops <= 2 * macs * 1.1


def test_cli_models_summary(capsys):
    assert cli_main(["models", "--summary", "--size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("models at 64x64x3")
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert set(rows) == set(MODEL_NAMES)
    # The default U-Net (Buda et al.: 32 features, 4 levels, batch norm), counted by hand:
    # bias-free 3x3 convs each followed by batch norm (scale + bias).
    conv_bn = lambda cin, cout: 9 * cin * cout + 2 * cout
    enc = [(3, 32), (32, 64), (64, 128), (128, 256), (256, 512)]
    unet = sum(conv_bn(a, b) + conv_bn(b, b) for a, b in enc)
    for cin, f in [(512, 256), (256, 128), (128, 64), (64, 32)]:
        unet += conv_bn(cin, f) + conv_bn(2 * f, f) + conv_bn(f, f)
    unet += 32 + 1 + (512 * 128 + 128) + (128 * 2 + 2)  # mask 1x1 conv, classifier head
    assert int(rows["unet"][1].replace(",", "")) == unet
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows.values())
    assert cli_main(["models", "--summary", "--names", "resnet"]) == 2
    assert cli_main(["models", "--summary", "--size", "100"]) == 2
