"""TFDS `lgg_mri` builder, raw decoding and the grain pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from dlvae_jax.cli import main
from dlvae_jax.data import lgg, pipeline, tfds_lgg
from dlvae_jax.data.pipeline import Shard
from dlvae_jax.data.splits import read_splits
from dlvae_jax.data.synth import synthesize
from dlvae_jax.errors import DataError

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def built(synth_dir, tmp_path_factory):
    tfds_dir = tmp_path_factory.mktemp("tfds")
    assert main(["data", "build", "--data-dir", str(synth_dir), "--tfds-dir", str(tfds_dir), "--seed", "2"]) == 0
    return tfds_dir


def _tiff_lookup(data_dir):
    return {(r.patient, r.slice_number): r for r in lgg.scan(data_dir)}


def test_source_gives_back_exactly_the_tiff_pixels(built, synth_dir):
    lookup = _tiff_lookup(synth_dir)
    splits = read_splits(built)
    seen = set()
    for split, patients in splits.items():
        src = tfds_lgg.data_source(built, split)
        raw = tfds_lgg.raw_source(built, split)
        for i in range(len(src)):
            ex = src[i]
            key = (ex["patient"].decode(), int(ex["slice_number"]))
            assert key[0] in patients and key not in seen
            seen.add(key)
            rec = lookup[key]
            np.testing.assert_array_equal(ex["image"], tifffile.imread(rec.path))
            np.testing.assert_array_equal(ex["mask"], (tifffile.imread(rec.mask_path) > 0).astype(np.uint8))
            assert bool(ex["has_tumor"]) == rec.has_tumor and ex["institution"].decode() == rec.institution
            fast = tfds_lgg.decode_raw(raw[i])
            assert fast.keys() == ex.keys()
            for k in ex:
                np.testing.assert_array_equal(fast[k], ex[k])
    assert seen == set(lookup)  # every slice stored exactly once


def test_build_refuses_to_overwrite(built, synth_dir, capsys):
    assert main(["data", "build", "--data-dir", str(synth_dir), "--tfds-dir", str(built)]) == 2
    assert "already built" in capsys.readouterr().err


def test_build_failing_inside_tfds_leaves_nothing(tmp_path):
    """A slice that breaks after the scan fails inside TFDS: a fresh build leaves
    no folder at all, a rebuild with --overwrite leaves the old build intact."""
    data = synthesize(tmp_path / "lgg", n_patients=2, seed=5, size=64, slices_per_patient=4)
    index = lgg.scan(data)
    tfds_dir = tmp_path / "tfds"
    tfds_lgg.build(data, tfds_dir, index=index)
    before = {p: p.read_bytes() for p in tfds_dir.rglob("*") if p.is_file()}
    bad = index.records[-1].path
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=bad.name):
        tfds_lgg.build(data, tfds_dir, index=index, overwrite=True)
    assert {p: p.read_bytes() for p in tfds_dir.rglob("*") if p.is_file()} == before
    with pytest.raises(DataError, match=bad.name):
        tfds_lgg.build(data, tmp_path / "fresh", index=index)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lgg", "tfds"]  # no staging folder either


@pytest.mark.parametrize("batch", [5, 7, 64])
def test_eval_visits_every_slice_once(built, batch):
    n = len(tfds_lgg.data_source(built, "train"))
    assert n % batch  # the point: batch sizes that do not divide the split
    src = tfds_lgg.data_source(built, "train")
    seen = []
    for b in pipeline.host_iterator(pipeline.eval_dataset(built, "train", batch, shard=Shard(0, 1))):
        assert b["image_BxHxWxC"].shape == (batch, 256, 256, 1) and b["valid_B"].shape == (batch,)
        seen += b["index_B"][b["valid_B"]].tolist()
        assert not b["image_BxHxWxC"][~b["valid_B"]].any() and (b["index_B"][~b["valid_B"]] == -1).all()
        j = int(np.flatnonzero(b["valid_B"])[-1])
        np.testing.assert_array_equal(b["image_BxHxWxC"][j, ..., 0], src[int(b["index_B"][j])]["image"][..., 1])
        np.testing.assert_array_equal(b["mask_BxHxW"][j], src[int(b["index_B"][j])]["mask"])
    assert sorted(seen) == list(range(n))


def test_eval_and_train_shard_across_processes(built):
    n = len(tfds_lgg.data_source(built, "train"))
    seen = []
    counts = []
    for p in range(2):
        batches = list(pipeline.eval_dataset(built, "train", 10, shard=Shard(p, 2)))
        counts.append(len(batches))
        seen += [i for b in batches for i in b["index_B"][b["valid_B"]].tolist()]
    assert counts[0] == counts[1] and sorted(seen) == list(range(n))

    per_proc = []
    for p in range(2):
        ds = pipeline.train_dataset(built, "train", 10, seed=1, num_epochs=1, shard=Shard(p, 2))
        per_proc.append([b["index_B"].tolist() for b in ds])
    assert len(per_proc[0]) == len(per_proc[1]) == n // 10  # drop remainder, equal on every process
    flat = [i for proc in per_proc for b in proc for i in b]
    assert len(flat) == len(set(flat)) == n // 10 * 10
    assert all(len(b) == 5 for proc in per_proc for b in proc)


def test_train_shuffles_deterministically_and_reshuffles_each_epoch(built):
    def order(seed):
        ds = pipeline.train_dataset(built, "train", 8, seed=seed, num_epochs=2, shard=Shard(0, 1))
        return [b["index_B"].tolist() for b in ds]

    a = order(3)
    assert a == order(3) and a != order(4)
    half = len(a) // 2
    epoch1, epoch2 = sum(a[:half], []), sum(a[half:], [])
    assert sorted(epoch1) == sorted(epoch2) == sorted(set(epoch1)) and epoch1 != epoch2
    assert epoch1 != sorted(epoch1)
    b = next(iter(pipeline.train_dataset(built, "train", 8, channels="all", shard=Shard(0, 1))))
    assert b["image_BxHxWxC"].shape == (8, 256, 256, 3) and b["image_BxHxWxC"].dtype == np.uint8 and b["valid_B"].all()


def test_multi_device_global_batches_without_tensorflow(built):
    code = textwrap.dedent(f"""
        import sys
        import jax, numpy as np
        from dlvae_jax.data import pipeline
        from dlvae_jax.data.augment import augment_batch
        from dlvae_jax.train import runners
        assert jax.device_count() == 4
        sharding = runners.batch_sharding(runners.data_mesh())
        host = list(pipeline.eval_dataset({str(built)!r}, "train", 12))
        dev = list(runners.device_iterator(iter(host), lambda b: runners.to_global(b, sharding)))
        assert len(dev) == len(host)
        for h, d in zip(host, dev):
            for k in h:
                assert d[k].shape == h[k].shape and d[k].sharding == sharding
                assert len(d[k].addressable_shards) == 4 and d[k].addressable_shards[0].data.shape[0] == 3
                np.testing.assert_array_equal(np.asarray(d[k]), h[k])
        img, msk = augment_batch(jax.random.key(0), dev[0]["image_BxHxWxC"], dev[0]["mask_BxHxW"])
        assert img.shape == (12, 256, 256, 1) and img.sharding.spec[0] == "data"
        assert "tensorflow" not in sys.modules, "TensorFlow was imported"
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
