"""TFDS `lgg_mri` builder, raw decoding, the grain pipeline and the run's loaders (memory / array_record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from dlvae_jax.cli import main
from dlvae_jax.data import lgg, pipeline, source, tfds_lgg
from dlvae_jax.data.pipeline import Shard
from dlvae_jax.data.splits import make_splits, read_splits, records_for_split
from dlvae_jax.data.synth import synthesize
from dlvae_jax.errors import DataError, OutputError

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


# ----------------------------------------------------------------------------- dlvae_jax.data.source
#
# The run's loaders: in memory or from an array_record cache built from the
# run's own splits. Tiny synthetic data (32x32, 6 patients x 5 slices).


def _tiny(path, slices=5):
    data = synthesize(path, n_patients=6, seed=1, size=32, slices_per_patient=slices)
    index = lgg.scan(data)
    return index, make_splits(index, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(index, splits, cache_dir): a tiny dataset and one cache folder shared by the read-only tests."""
    index, splits = _tiny(tmp_path_factory.mktemp("tiny") / "lgg")
    assert len(records_for_split(index, splits, "train")) == 20 and len(records_for_split(index, splits, "validation"))
    return index, splits, tmp_path_factory.mktemp("cache")


def _pair(tiny, split, channels="flair"):
    index, splits, cache = tiny
    mem = source.split_loader(index, splits, split, channels)
    arr = source.split_loader(index, splits, split, channels, source="array_record", cache_dir=cache)
    assert isinstance(mem, source.MemoryLoader) and isinstance(arr, source.ArrayRecordLoader)
    return mem, arr


def _assert_same(a, b):
    assert a.keys() == b.keys() == set(pipeline.BATCH_KEYS)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_choose_source_rule():
    assert source.choose_source(4096) == "memory"  # 4096 x 128 KiB (256x256 FLAIR + mask) = 512 MiB
    assert source.choose_source(4097) == "array_record"
    all3 = source.slice_bytes(256, "all")
    assert all3 == 4 * 256 * 256
    assert source.choose_source(2048, bytes_per_slice=all3) == "memory"
    assert source.choose_source(2049, bytes_per_slice=all3) == "array_record"
    assert source.choose_source(10**6, "memory") == "memory"
    assert source.choose_source(1, "array_record") == "array_record"
    with pytest.raises(ValueError):
        source.choose_source(1, "disk")


@pytest.mark.parametrize("channels", ["flair", "all"])
def test_train_batches_identical_on_both_paths_and_resume_across_them(tiny, channels):
    """Same seed: byte-identical batches over two epochs; a data position saved on
    one path resumes on the exact next batch on either path."""
    mem, arr = _pair(tiny, "train", channels)

    def iterator(loader):
        ds = pipeline.train_dataset(loader, global_batch_size=4, seed=3, shard=Shard(0, 1))
        return iter(pipeline.host_iterator(ds, num_threads=2, prefetch=4))

    it_m, it_a = iterator(mem), iterator(arr)
    steps = 12  # 20 slices / 4 = 5 batches an epoch: crosses two epoch boundaries
    saved_at, states, tail = 7, {}, []
    for step in range(steps):
        bm, ba = next(it_m), next(it_a)
        _assert_same(bm, ba)
        if step == 0:
            c = 1 if channels == "flair" else 3
            assert bm["image_BxHxWxC"].shape == (4, 32, 32, c) and bm["valid_B"].all()
        if step + 1 == saved_at:
            states = {"memory": it_m.get_state(), "array_record": it_a.get_state()}
        if step + 1 > saved_at:
            tail.append(bm)
    assert states["memory"] == states["array_record"]
    for saved in states.values():
        for loader in (mem, arr):
            it = iterator(loader)
            it.set_state(json.loads(json.dumps(saved)))  # as a checkpoint stores it
            for want in tail:
                _assert_same(next(it), want)


def test_eval_batches_identical_on_both_paths(tiny):
    for split in ("validation", "train"):
        mem, arr = _pair(tiny, split)
        got_m = list(pipeline.eval_dataset(mem, global_batch_size=3, shard=Shard(0, 1)))
        got_a = list(pipeline.eval_dataset(arr, global_batch_size=3, shard=Shard(0, 1)))
        assert len(got_m) == len(got_a) == -(-len(mem) // 3)
        assert not got_m[-1]["valid_B"].all() or len(mem) % 3 == 0
        for bm, ba in zip(got_m, got_a):
            _assert_same(bm, ba)


def test_records_are_in_loader_order_and_memory_loads_lazily(tiny):
    index, splits, _ = tiny
    mem, arr = _pair(tiny, "train")
    assert mem._arrays is None and len(mem) == 20  # nothing read yet
    want = records_for_split(index, splits, "train")
    assert mem.records == arr.records == want
    batch = arr(np.array([19, -1, 0, 7]))
    for row, i in enumerate([19, -1, 0, 7]):
        if i < 0:
            assert not batch["valid_B"][row] and not batch["image_BxHxWxC"][row].any()
            continue
        np.testing.assert_array_equal(batch["image_BxHxWxC"][row, ..., 0], tifffile.imread(want[i].path)[..., 1])
        np.testing.assert_array_equal(batch["mask_BxHxW"][row], tifffile.imread(want[i].mask_path) > 0)
    assert read_splits(arr.tfds_dir) == splits  # the cache's splits.json is the run's


def test_each_process_reads_only_its_shard(tiny):
    _, arr = _pair(tiny, "train")
    n = len(arr)

    class Spy:  # records what the array_record source is asked to read
        def __init__(self, src):
            self.src, self.read = src, []

        def __len__(self):
            return len(self.src)

        def __getitems__(self, idx):
            self.read += list(idx)
            return self.src.__getitems__(idx)

    for make, total in ((lambda ld, p: pipeline.train_dataset(ld, global_batch_size=4, seed=0, num_epochs=1,
                                                                  shard=Shard(p, 2)), n // 4 * 4),
                        (lambda ld, p: pipeline.eval_dataset(ld, global_batch_size=6, shard=Shard(p, 2)), n)):
        reads = []
        for p in range(2):
            loader = source.ArrayRecordLoader(arr.tfds_dir, "train", "flair", arr.records)
            loader.source = spy = Spy(loader.source)
            got = [i for b in make(loader, p) for i in b["index_B"][b["valid_B"]].tolist()]
            assert sorted(spy.read) == sorted(got)  # read exactly what this process yields
            reads.append(set(spy.read))
        assert not reads[0] & reads[1] and len(reads[0] | reads[1]) == total


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(tmp_path):
    index, splits = _tiny(tmp_path / "lgg")
    cache = tmp_path / "cache"
    n0 = source.build_count
    a = source.split_loader(index, splits, "train", source="array_record", cache_dir=cache)
    manifest = a.tfds_dir / tfds_lgg.NAME / source.CACHE_FILE
    stamp = manifest.stat().st_mtime_ns
    assert a.built and source.build_count == n0 + 1
    b = source.split_loader(index, splits, "validation", source="array_record", cache_dir=cache)
    assert not b.built and b.tfds_dir == a.tfds_dir and source.build_count == n0 + 1
    assert manifest.stat().st_mtime_ns == stamp

    moved = {"train": splits["train"][1:], "validation": splits["validation"] + splits["train"][:1],
             "test": splits["test"]}
    c = source.split_loader(index, moved, "validation", source="array_record", cache_dir=cache)
    assert c.built and c.tfds_dir != a.tfds_dir and source.build_count == n0 + 2
    assert c.records == records_for_split(index, moved, "validation")
    mem = source.split_loader(index, moved, "validation")
    _assert_same(mem(np.arange(len(mem))), c(np.arange(len(c))))

    # A slice file changed since the build: the same cache is built again.
    f = index.records[0].mask_path
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    d = source.split_loader(index, splits, "train", source="array_record", cache_dir=cache)
    assert d.built and d.tfds_dir == a.tfds_dir and source.build_count == n0 + 3
    assert manifest.stat().st_mtime_ns != stamp
    e = source.split_loader(index, splits, "train", source="array_record", cache_dir=cache)
    assert not e.built and source.build_count == n0 + 3


@pytest.mark.parametrize("damage", ["truncated shard", "no cache.json", "left-over staging"])
def test_damaged_or_half_written_cache_is_rebuilt(tmp_path, damage):
    index, splits = _tiny(tmp_path / "lgg")
    cache = tmp_path / "cache"
    a = source.split_loader(index, splits, "train", source="array_record", cache_dir=cache)
    final = a.tfds_dir / tfds_lgg.NAME
    want = a(np.arange(len(a)))
    del a
    if damage == "truncated shard":
        shard = next((final / "1.0.0").glob("*-train.array_record-*"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "no cache.json":
        (final / source.CACHE_FILE).unlink()
    else:  # a builder killed before its rename: staging beside, nothing in place
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        from dlvae_jax.outdir import sibling

        staging = final.parent / (sibling(final, "tmp").replace(f"-{os.getpid()}-", f"-{dead}-") + "x1")
        os.rename(final, staging)
        (staging / source.CACHE_FILE).unlink()
    n0 = source.build_count
    b = source.split_loader(index, splits, "train", source="array_record", cache_dir=cache)
    assert b.built and source.build_count == n0 + 1
    _assert_same(b(np.arange(len(b))), want)
    assert final.is_dir() and not [p.name for p in final.parent.iterdir() if "tmp" in p.name or "old" in p.name]


def test_users_tfds_dir_must_hold_the_runs_splits(tmp_path):
    index, splits = _tiny(tmp_path / "lgg")
    built_dir = tmp_path / "tfds"
    tfds_lgg.build(index.root, built_dir, split_seed=0, index=index)  # seed 0: the run's splits
    arr = source.split_loader(index, splits, "train", source="auto", tfds_dir=built_dir)
    assert isinstance(arr, source.ArrayRecordLoader) and not arr.built
    mem = source.split_loader(index, splits, "train")
    for bm, ba in zip(pipeline.train_dataset(mem, global_batch_size=4, seed=0, num_epochs=1, shard=Shard(0, 1)),
                      pipeline.train_dataset(arr, global_batch_size=4, seed=0, num_epochs=1, shard=Shard(0, 1))):
        _assert_same(bm, ba)

    other = make_splits(index, 5)
    assert other["train"] != splits["train"]
    with pytest.raises(DataError, match=f"^{built_dir}: its 'train' split is not the run's"):
        source.split_loader(index, other, "train", source="array_record", tfds_dir=built_dir)
    # Same patients, other slices: a build of another folder.
    index4, _ = _tiny(tmp_path / "lgg4", slices=4)
    other_dir = tmp_path / "tfds4"
    tfds_lgg.build(index4.root, other_dir, split_seed=0, index=index4)
    with pytest.raises(DataError, match=f"^{other_dir}: its 'train' split holds 16 slices"):
        source.split_loader(index, splits, "train", source="array_record", tfds_dir=other_dir)
    with pytest.raises(DataError, match="no readable|not a readable"):
        source.split_loader(index, splits, "train", source="array_record", tfds_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError):
        source.split_loader(index, splits, "train", source="memory", tfds_dir=built_dir)


def test_split_loader_refusals(tiny):
    index, splits, _ = tiny
    with pytest.raises(ValueError, match="cache_dir"):
        source.split_loader(index, splits, "train", source="array_record")
    with pytest.raises(DataError, match="no slices"):
        source.split_loader(index, dict(splits, test=[]), "test")
    with pytest.raises(DataError, match="no split named"):
        source.split_loader(index, splits, "holdout")
    assert isinstance(source.split_loader(index, splits, "train", source="auto"), source.MemoryLoader)


def test_concurrent_callers_build_the_cache_once(tmp_path):
    import threading

    index, splits = _tiny(tmp_path / "lgg")
    n0 = source.build_count
    results, errors = [], []

    def call(split):
        try:
            results.append(source.split_loader(index, splits, split, source="array_record", cache_dir=tmp_path / "c"))
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(s,)) for s in ("train", "validation", "train")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and source.build_count == n0 + 1
    assert sorted(r.built for r in results) == [False, False, True]


def test_a_cache_inside_the_data_folder_is_refused_before_anything_is_created(tmp_path):
    index, splits = _tiny(tmp_path / "lgg")
    before = sorted(p.name for p in (tmp_path / "lgg").rglob("*"))
    for cache_dir in (tmp_path / "lgg", tmp_path / "lgg" / "sub"):
        with pytest.raises(OutputError, match="inside the input folder"):
            source.split_loader(index, splits, "train", source="array_record", cache_dir=cache_dir)
    assert sorted(p.name for p in (tmp_path / "lgg").rglob("*")) == before
