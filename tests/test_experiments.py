"""The statistics and the fold bookkeeping of experiments/vae_effect.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "vae_effect.py"
_spec = importlib.util.spec_from_file_location("vae_effect", _PATH)
vae_effect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vae_effect)


def test_every_patient_is_tested_once_and_never_trained_on_in_its_fold():
    patients = [f"P{i:02d}" for i in range(39)]
    folds = vae_effect.assign_folds(patients, 5, seed=3)
    assert sorted(p for f in folds for p in f) == patients
    assert {len(f) for f in folds} <= {7, 8}
    assert vae_effect.assign_folds(patients, 5, seed=3) == folds  # same seed, same folds
    for i in range(5):
        s = vae_effect.fold_splits(folds, i, 4, seed=3)
        assert s["test"] == folds[i] and len(s["validation"]) == 4
        assert not (set(s["train"]) | set(s["validation"])) & set(s["test"])
        assert not set(s["train"]) & set(s["validation"])
        assert sorted(s["train"] + s["validation"] + s["test"]) == patients
        # No validation patients (the `cpu` recipe's protocol): every patient outside the test fold trains.
        s0 = vae_effect.fold_splits(folds, i, 0, seed=3)
        assert s0["validation"] == [] and s0["test"] == folds[i]
        assert s0["train"] == sorted(set(patients) - set(folds[i]))


def test_recorded_cv_commands_keep_the_augmentation_they_ran_with(tmp_path):
    """The `cpu` config widened its rotations and scaling after earlier cross-validations; their recorded
    commands (no --set for them) still resolve to 10 degrees and 10%, and an explicit --set wins."""
    from argparse import Namespace

    from dlvae_jax import configs

    assert (configs.load("cpu").augment.max_rotate_deg, configs.load("cpu").augment.max_scale) == (20.0, 0.2)
    for name in ("unet", "cnn", "vgg16", "dcnn"):  # the baselines as they were measured
        assert (configs.load(name).augment.max_rotate_deg, configs.load(name).augment.max_scale) == (10.0, 0.1)
    args = Namespace(set=[], data_dir=tmp_path, seed=0, steps=30)
    for arm in ("dlvae_cnn", "no_vae"):
        cfg = vae_effect.arm_config(arm, args, 0)
        assert (cfg.augment.max_rotate_deg, cfg.augment.max_scale) == (10.0, 0.1)
    args.set = ["augment.max_rotate_deg=20", "augment.max_scale=0.2"]
    cfg = vae_effect.arm_config("dlvae_cnn", args, 0)
    assert (cfg.augment.max_rotate_deg, cfg.augment.max_scale) == (20.0, 0.2)


def test_paired_stats_by_hand_and_against_scipy():
    a = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    b = np.array([0.8, 0.8, 0.5, 0.7, 0.2, 0.1])
    s = vae_effect.paired_stats(a, b, draws=2000, seed=0)
    d = a - b
    assert s["n"] == 6 and s["wins"] == 4 and s["losses"] == 1 and s["ties"] == 1
    assert s["mean_diff"] == pytest.approx(d.mean()) and s["median_diff"] == pytest.approx(np.median(d))
    assert s["wilcoxon_p"] == pytest.approx(wilcoxon(d[d != 0]).pvalue)
    lo, hi = s["ci95"]
    assert lo < d.mean() < hi and lo >= d.min() and hi <= d.max()
    # The bootstrap is the percentile interval of resampled means (NumPy, same draws).
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, 6, size=(2000, 6))].mean(axis=1)
    assert [lo, hi] == pytest.approx([np.percentile(means, 2.5), np.percentile(means, 97.5)])


def _write_cv(path: Path, folds, dice: dict, overrides, steps=600, val_patients=4):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": "python experiments/vae_effect.py ...", "folds_patients": folds, "steps": steps,
        "val_patients": val_patients, "overrides": overrides,
        "arms": {"dlvae_cnn": {"slice_accuracy": 0.8, "per_patient": {p: {"dice": v} for p, v in dice.items()}}}}))


def test_recipe_pairs_the_same_patients_and_refuses_other_folds(tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("recipe", _PATH.with_name("recipe.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    folds = [["A", "B"], ["C", "D"], ["E", "F"]]
    base = {"A": 0.5, "B": 0.6, "C": 0.2, "D": 0.9, "E": 0.4, "F": 0.3}
    new = {"F": 0.5, "E": 0.4, "D": 0.7, "C": 0.5, "B": 0.9, "A": 0.6}  # another order: paired by name
    _write_cv(tmp_path / "a.json", folds, base, ["data.image_size=64"])
    _write_cv(tmp_path / "b.json", folds, new, ["data.image_size=64", "data.channels=all"])
    out = tmp_path / "out"
    assert recipe.main([f"{tmp_path / 'a.json'}:dlvae_cnn", f"{tmp_path / 'b.json'}:dlvae_cnn",
                        "--out", str(out), "--name", "ch", "--bootstrap", "500"]) == 0
    got = json.loads((out / "ch.json").read_text())
    d = np.array([new[p] - base[p] for p in sorted(base)])
    c = got["comparisons"][0]
    assert c["n"] == 6 and c["mean_diff"] == pytest.approx(d.mean())
    assert (c["wins"], c["losses"], c["ties"]) == (4, 1, 1)
    assert got["rows"][1]["dice"]["mean"] == pytest.approx(np.mean(list(new.values())))
    assert "data.channels=all" in (out / "ch.md").read_text()
    # Other folds (or step counts) are not comparable: refused.
    _write_cv(tmp_path / "c.json", [["A", "C"], ["B", "D"], ["E", "F"]], new, [])
    with pytest.raises(SystemExit, match="folds differ"):
        recipe.main([f"{tmp_path / 'a.json'}:dlvae_cnn", f"{tmp_path / 'c.json'}:dlvae_cnn", "--out", str(out)])
    _write_cv(tmp_path / "d.json", folds, new, [], steps=300)
    with pytest.raises(SystemExit, match="steps"):
        recipe.main([f"{tmp_path / 'a.json'}:dlvae_cnn", f"{tmp_path / 'd.json'}:dlvae_cnn", "--out", str(out)])
    # ... unless the steps are what is compared; each label then names its steps.
    assert recipe.main([f"{tmp_path / 'a.json'}:dlvae_cnn", f"{tmp_path / 'd.json'}:dlvae_cnn", "--out", str(out),
                        "--name", "st", "--steps-vary", "--bootstrap", "500"]) == 0
    got = json.loads((out / "st.json").read_text())
    assert got["comparisons"][0]["mean_diff"] == pytest.approx(d.mean())
    assert got["rows"][0]["label"].endswith("600 steps") and got["rows"][1]["label"].endswith("300 steps")
    # Folds that held back no validation patients trained on more: the labels say so.
    _write_cv(tmp_path / "e.json", folds, new, ["data.image_size=64"], val_patients=0)
    assert recipe.main([f"{tmp_path / 'a.json'}:dlvae_cnn", f"{tmp_path / 'e.json'}:dlvae_cnn", "--out", str(out),
                        "--name", "nv", "--bootstrap", "500"]) == 0
    labels = [r["label"] for r in json.loads((out / "nv.json").read_text())["rows"]]
    assert labels[0].endswith("4 validation patients per fold")
    assert labels[1].endswith("no validation patients (last checkpoint)")


def test_recipe_reads_the_nested_figures_of_a_volume_rule_json(tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("recipe", _PATH.with_name("recipe.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    folds = [["A", "B"], ["C", "D"]]
    base = {"A": 0.5, "B": 0.6, "C": 0.2, "D": 0.9}
    _write_cv(tmp_path / "a" / "vae_effect.json", folds, base, [])
    _write_cv(tmp_path / "b" / "vae_effect.json", folds, {p: 0.0 for p in base}, [])  # not what is read
    nested = {"A": 0.7, "B": 0.6, "C": 0.1, "D": 0.95}
    (tmp_path / "b" / "volume_rule.json").write_text(json.dumps({
        "arm": "dlvae_cnn", "presence": "mask", "command": "python experiments/volume_rule.py ...",
        "nested": {"per_patient": nested, "accuracy": 0.93}}))
    out = tmp_path / "out"
    assert recipe.main([f"{tmp_path / 'a' / 'vae_effect.json'}:dlvae_cnn",
                        f"{tmp_path / 'b' / 'volume_rule.json'}:dlvae_cnn", "--out", str(out), "--bootstrap", "500"]) == 0
    got = json.loads((out / "recipe.json").read_text())
    c = got["comparisons"][0]
    assert c["mean_diff"] == pytest.approx(np.mean([nested[p] - base[p] for p in base]))
    assert (c["wins"], c["losses"], c["ties"]) == (2, 1, 1)
    assert got["rows"][1]["slice_accuracy"] == 0.93 and "3D rule (nested)" in got["rows"][1]["label"]
    # An ensemble's figures (several --runs folders) say so in their label.
    (tmp_path / "b" / "ens.json").write_text(json.dumps({
        "arm": "dlvae_cnn", "presence": "mask", "runs": ["w/one", "w/two"], "command": "python ...",
        "nested": {"per_patient": nested, "accuracy": 0.93}}))
    assert recipe.main([f"{tmp_path / 'b' / 'volume_rule.json'}:dlvae_cnn", f"{tmp_path / 'b' / 'ens.json'}:dlvae_cnn",
                        "--out", str(out), "--name", "ens", "--bootstrap", "500"]) == 0
    labels = [r["label"] for r in json.loads((out / "ens.json").read_text())["rows"]]
    assert "ensemble" not in labels[0] and labels[1].endswith("ensemble of w/one + w/two")
    with pytest.raises(SystemExit, match="arm"):
        recipe.main([f"{tmp_path / 'b' / 'volume_rule.json'}:unet", "--out", str(out)])
    (tmp_path / "b" / "vae_effect.json").unlink()
    with pytest.raises(SystemExit, match="no vae_effect.json beside it"):
        recipe.main([f"{tmp_path / 'b' / 'volume_rule.json'}:dlvae_cnn", "--out", str(out)])


def _script(name: str):
    """An experiments/ script, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, _PATH.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_volume_rule_scores_by_hand_and_picks_a_fold_share_on_the_other_folds_only():
    vr = _script("volume_rule")
    # One patient, 3 slices of 6x6: a 2x2x2 tumor predicted exactly, plus a stray pixel on slice 2.
    truth = np.zeros((3, 6, 6), bool)
    truth[0:2, 1:3, 1:3] = True
    prob = np.where(truth, 0.9, 0.1).astype(np.float32)
    prob[2, 5, 5] = 0.8
    pred = (prob, np.zeros(3, np.float32), truth)
    dice, right = vr.score_patient(pred, 0.0, "mask")
    assert dice == pytest.approx(2 * 8 / (9 + 8)) and right.tolist() == [True, True, False]
    dice, right = vr.score_patient(pred, 0.5, "mask")  # the 1-voxel component is under half of 8
    assert dice == 1.0 and right.tolist() == [True, True, True]
    # Picks: share 0.5 wins on folds a and b, share 0 on fold c; fold c's own best never decides its share.
    def fold(best):
        return {s: {"dice": {"p": 0.9 if s == best else 0.5}, "right": np.array([s == best])} for s in vr.SHARES}
    scores = {"a": fold(0.5), "b": fold(0.5), "c": fold(0.0)}
    assert vr._pick(scores, ["a", "b"]) == 0.5 and vr._pick(scores, ["c"]) == 0.0
    assert vr._pick(scores, ["a", "b", "c"]) == 0.5
    tie = {"a": {s: {"dice": {"p": 0.7}, "right": np.array([True])} for s in vr.SHARES}}
    assert vr._pick(tie, ["a"]) == 0.0  # a tie goes to the smaller share


def test_volume_rule_ensemble_averages_members_and_refuses_other_patients():
    vr = _script("volume_rule")
    rng = np.random.default_rng(0)
    truth = rng.random((3, 4, 4)) > 0.5
    a = {"P1": (rng.random((3, 4, 4)).astype(np.float32), rng.random(3).astype(np.float32), truth)}
    b = {"P1": (rng.random((3, 4, 4)).astype(np.float32), rng.random(3).astype(np.float32), truth)}
    prob, tumor_prob, got_truth = vr.average_predictions([a, b])["P1"]
    np.testing.assert_allclose(prob, (a["P1"][0] + b["P1"][0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(tumor_prob, (a["P1"][1] + b["P1"][1]) / 2, rtol=1e-6)
    assert np.array_equal(got_truth, truth)
    with pytest.raises(SystemExit, match="different test patients"):
        vr.average_predictions([a, {"P2": b["P1"]}])
    with pytest.raises(SystemExit, match="P1"):
        vr.average_predictions([a, {"P1": (b["P1"][0], b["P1"][1], ~truth)}])


def test_postprocess_search_transforms_by_hand():
    ps = _script("postprocess_search")
    prob = np.zeros((3, 7, 7), np.float32)
    prob[1, 1:4, 1:4] = 0.9   # the confident core
    prob[1, 2, 2] = 0.1       # a hole in it
    prob[0, 2, 2] = 0.35      # a faint edge slice touching the core (26-connected)
    prob[2, 6, 6] = 0.35      # faint, and touching nothing confident
    np.testing.assert_array_equal(ps.transform(prob, "threshold:0.3"), prob >= 0.3)
    hyst = ps.transform(prob, "hysteresis:0.3")
    expected = prob >= 0.5
    expected[0, 2, 2] = True  # joins the core; slice 2's faint pixel does not
    np.testing.assert_array_equal(hyst, expected)
    filled = ps.transform(prob, "fill")
    assert filled[1, 2, 2] == 1.0 and filled.sum() == 9
    smooth = ps.transform(prob, "smooth:0.2")
    # middle slice: 0.6 p[1] + 0.2 (p[0] + p[2]); first slice repeats itself as its missing neighbour
    assert smooth[1, 2, 2] == pytest.approx(0.6 * 0.1 + 0.2 * 0.35)
    assert smooth[0, 2, 2] == pytest.approx(0.6 * 0.35 + 0.2 * (0.35 + 0.1))
    with pytest.raises(ValueError, match="unknown candidate"):
        ps.transform(prob, "dilate:1")


def test_postprocess_search_nested_pick_never_uses_the_fold_itself():
    ps = _script("postprocess_search")
    keys = [("threshold:0.5", 0.0), ("fill", 0.0)]

    def fold(name, dice):  # one patient per fold, every slice right: only Dice decides
        return {k: {"dice": {name: d}, "right": np.array([True])} for k, d in zip(keys, dice)}
    scores = {"a": fold("A", (0.5, 0.9)), "b": fold("B", (0.5, 0.9)), "c": fold("C", (0.6, 0.5))}
    picks, dice, right = ps.nested(scores, keys)
    # c's own best (threshold) loses on a + b, so c gets fill; a and b each see fill win on the other two
    assert picks == {"a": keys[1], "b": keys[1], "c": keys[1]}
    assert dice == {"A": 0.9, "B": 0.9, "C": 0.5} and right.tolist() == [True, True, True]
    tie = {"a": {k: {"dice": {"p": 0.7}, "right": np.array([True])} for k in keys}}
    assert ps.pick(tie, ["a"], keys) == keys[0]  # a tie goes to the earlier key


def test_postprocess_search_error_breakdown_by_hand():
    ps = _script("postprocess_search")
    truth = np.zeros((7, 4, 4), bool)
    truth[0:6, 1:3, 1:3] = True            # a tumor on slices 0-5, 4 voxels each
    pred = truth.copy()
    pred[0] = False                        # its first slice missed entirely (an end)
    pred[2, 1, 1] = False                  # one voxel missed on a slice that is found
    pred[6, 0, 0] = True                   # one false positive on an empty slice
    e = ps.error_breakdown(pred, truth)
    assert e == {"tp": 19, "fp": 1, "fn": 5, "fn_on_missed_slices": 4, "missed_slices": 1, "missed_at_ends": 1}
    pred[1:3] = False                      # slices 1 and 2 too: slice 2 is two from the nearer end
    e = ps.error_breakdown(pred, truth)
    assert (e["missed_slices"], e["missed_at_ends"], e["fn_on_missed_slices"]) == (3, 2, 12)
