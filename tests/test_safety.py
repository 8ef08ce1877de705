"""Fault injection: no command loses a user's data, crashes, or leaves debris.

Each case checks independent facts: the bytes of the input folder (hashed
before and after), the files a user put beside the output, the exit code, the
one line printed, and that no temporary survives the next run. Signal cases
run real `python -m dlvae_jax.cli` processes and signal them while their
temporary folder exists, i.e. while work is in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlvae_jax.cli import build_parser, main
from dlvae_jax.classical import blank_slices
from dlvae_jax.data.synth import synthesize
from dlvae_jax.errors import DlvaeError, OutputError
from dlvae_jax.outdir import MARKER, lock_path, output_folder, remove_stale_temporaries, run_folder, sibling

from conftest import REPO_ROOT

P1 = "TCGA_SY_0001_20000101"


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, and "<dir>" for every folder."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != MARKER)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("tiny") / "lgg", n_patients=2, seed=3, size=64, slices_per_patient=6)


@pytest.fixture
def data(tiny, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(tiny, dst)
    return dst


def run_cli(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- data deleted


@pytest.mark.parametrize("where", ["patient_folder", "data_dir", "parent_of_data", "symlink_into_data"])
def test_output_overlapping_the_data_is_refused(where, data, tmp_path, capsys):
    before = tree_hash(tmp_path)
    out = {"patient_folder": data / P1, "data_dir": data, "parent_of_data": tmp_path,
           "symlink_into_data": tmp_path / "link"}[where]
    if where == "symlink_into_data":
        out.symlink_to(data / P1)
        before = tree_hash(tmp_path)
    rc, _, err = run_cli(["classical", "--data-dir", data, "--out", out, "--overwrite", "--quiet"], capsys)
    assert rc == 2
    line = one_line(err)
    assert line.startswith(f"dlvae-jax: error: {out}: ") and "input folder" in line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("command", ["classical", "data synth", "data build"])
def test_overwrite_never_deletes_a_folder_we_did_not_make(command, data, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    args = {"classical": ["classical", "--out", mine, "--quiet"],
            "data synth": ["data", "synth", "--out", mine, "--size", "32", "--slices", "3", "--patients", "1"],
            "data build": ["data", "build", "--data-dir", data, "--tfds-dir", tmp_path]}[command]
    if command == "data build":  # the TFDS dir is shared; only lgg_mri/ inside it is ours
        (tmp_path / "lgg_mri").mkdir()
        (tmp_path / "lgg_mri" / "notes.txt").write_text("not ours")
    before = tree_hash(tmp_path)
    rc, _, err = run_cli(args + ["--overwrite"], capsys)
    assert rc == 2 and "was not made by dlvae-jax" in one_line(err)
    assert tree_hash(tmp_path) == before
    monkeypatch.chdir(mine)  # --out "$PWD"
    args = [a if a != mine else Path.cwd() for a in args]
    rc, _, err = run_cli(args + ["--overwrite"], capsys)
    assert rc == 2 and "was not made by dlvae-jax" in one_line(err)
    assert tree_hash(tmp_path) == before


def test_overwrite_replaces_a_folder_we_made(tmp_path, capsys):
    out = tmp_path / "synth"
    base = ["data", "synth", "--out", out, "--size", "32", "--slices", "3"]
    assert run_cli(base + ["--patients", "1"], capsys)[0] == 0
    rc, _, err = run_cli(base + ["--patients", "2"], capsys)
    assert rc == 2 and "pass --overwrite" in one_line(err)
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1
    assert run_cli(base + ["--patients", "2", "--overwrite"], capsys)[0] == 0
    assert len([p for p in out.iterdir() if p.is_dir()]) == 2
    assert json.loads((out / MARKER).read_text())["command"] == "data synth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


# ----------------------------------------------------------------------------- scanning


def _pair(data: Path, n: str, src: int = 1, ext: str = ".tif") -> Path:
    d = data / P1
    shutil.copy(d / f"{P1}_{src}.tif", d / f"{P1}_{n}{ext}")
    shutil.copy(d / f"{P1}_{src}_mask.tif", d / f"{P1}_{n}_mask{ext}")
    return d / f"{P1}_{n}{ext}"


def test_huge_slice_number_is_one_line_fast(data, capsys):
    before = tree_hash(data)
    bad = _pair(data, "99999999999")
    t0 = time.perf_counter()
    rc, _, err = run_cli(["data", "check", "--data-dir", data], capsys)
    assert rc == 2 and str(bad) in one_line(err) and "slice number" in err
    # The largest allowed number: a gap of two billion slices, reported in bounded time and memory.
    for p in data.glob(f"*/*99999999999*"):
        p.unlink()
    _pair(data, str(2**31 - 1))
    rc, out, err = run_cli(["data", "check", "--data-dir", data], capsys)
    assert rc == 0 and f"dlvae-jax: warning: TCGA_SY_0001: gap in slice numbers, missing [7, 8, 9" in err
    assert time.perf_counter() - t0 < 20
    for p in data.glob(f"*/*_{2**31 - 1}*"):
        p.unlink()
    assert tree_hash(data) == before


@pytest.mark.parametrize("spelling", ["leading_zero", "tiff", "upper_case"])
def test_duplicate_slices_name_both_files(spelling, data, tmp_path, capsys):
    n, ext = {"leading_zero": ("02", ".tif"), "tiff": ("2", ".tiff"), "upper_case": ("2", ".TIF")}[spelling]
    dup = _pair(data, n, src=3, ext=ext)
    first = data / P1 / f"{P1}_2.tif"
    before = tree_hash(data)
    rc, _, err = run_cli(["data", "check", "--data-dir", data], capsys)
    line = one_line(err)
    assert rc == 2 and {str(dup), str(first)} <= {t.strip(":;,()") for t in line.split()}
    rc, out, _ = run_cli(["data", "check", "--data-dir", data, "--skip-bad"], capsys)
    assert rc == 0 and "slices: 11\n" in out  # slice 2 of 12 dropped: both of its spellings
    rc, _, err = run_cli(["data", "build", "--data-dir", data, "--tfds-dir", tmp_path / "t"], capsys)
    assert rc == 2 and str(dup) in err and not (tmp_path / "t").exists()
    assert tree_hash(data) == before


def test_one_patient_under_two_dates(data, capsys):
    other = data / "TCGA_SY_0001_20010101"
    other.mkdir()
    for f in (data / P1).iterdir():
        shutil.copy(f, other / f.name.replace("20000101", "20010101"))
    before = tree_hash(data)
    rc, _, err = run_cli(["data", "check", "--data-dir", data], capsys)
    line = one_line(err)
    assert rc == 2 and str(data / P1) in line and str(other) in line and "TCGA_SY_0001" in line
    rc, out, _ = run_cli(["data", "check", "--data-dir", data, "--skip-bad"], capsys)
    assert rc == 0 and "patients: 1 " in out
    assert tree_hash(data) == before


@pytest.mark.parametrize("content", [b"\xef\xbb\xbfPatient,x\nTCGA_SY_0001,1\nTCGA_SZ_0002,2\n", b"", b"\xff\xfe\x00"])
def test_data_csv_bom_or_empty_is_not_fatal(content, data, capsys):
    (data / "data.csv").write_bytes(content)
    rc, out, err = run_cli(["data", "check", "--data-dir", data], capsys)
    assert rc == 0 and "patients: 2 " in out
    if content.startswith(b"\xef\xbb\xbf"):
        assert err == ""  # read: both patients have a row
    else:
        assert one_line(err).startswith(f"dlvae-jax: warning: {data / 'data.csv'}: ") and "ignored" in err


# ----------------------------------------------------------------------------- options


BAD_OPTIONS = [
    (["classical", "--out", "o", "--seed", "-1"], "--seed"),
    (["classical", "--out", "o", "--seed", str(2**64 + 1)], "--seed"),
    (["classical", "--out", "o", "--k", "300"], "--k"),
    (["classical", "--out", "o", "--k", "1"], "--k"),
    (["classical", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["data", "synth", "--out", "o", "--seed", "-1"], "--seed"),
    (["data", "synth", "--out", "o", "--size", "100000"], "--size"),
    (["data", "synth", "--out", "o", "--patients", "0"], "--patients"),
    (["data", "split", "--data-dir", "d", "--workdir", "w", "--fractions", "nan", "nan", "nan"], "--fractions"),
    (["data", "split", "--data-dir", "d", "--workdir", "w", "--seed", "-1"], "--seed"),
    (["data", "build", "--data-dir", "d", "--tfds-dir", "t", "--fractions", "inf", "0", "0"], "--fractions"),
    (["models", "--summary", "--channels", "0"], "--channels"),
    (["models", "--summary", "--channels", "-1"], "--channels"),
    (["models", "--summary", "--size", "100000"], "--size"),
]


@pytest.mark.parametrize("args,flag", BAD_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_bad_numbers_are_one_line_at_the_parser(args, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(args, capsys)
    line = one_line(err)
    assert rc == 2 and f"argument {flag}" in line and args[-1] in line
    assert list(tmp_path.iterdir()) == []


def test_fraction_sum_and_typo_in_subcommand_flag(data, tmp_path, capsys):
    rc, _, err = run_cli(["data", "split", "--data-dir", data, "--workdir", tmp_path / "w",
                          "--fractions", "0.5", "0.5", "0.5"], capsys)
    assert rc == 2 and "summing to 1" in one_line(err)
    rc, _, err = run_cli(["data", "check", "--data-dir", data, "--skip-bda"], capsys)
    line = one_line(err)
    assert rc == 2 and line.startswith("dlvae-jax data check: error:") and "did you mean --skip-bad?" in line
    assert build_parser().parse_args(["classical", "--out", "o", "--skip-bad"]).skip_bad
    help_text = build_parser()._subparsers._group_actions[0].choices["classical"].format_help()
    assert "(default: 64)" in help_text and "(default: head)" in help_text


# ----------------------------------------------------------------------------- blank slices


def test_blank_slices_get_no_roi():
    rng = np.random.default_rng(0)
    flat = np.full((64, 64), 37, np.uint8)
    near_flat = (rng.integers(0, 9, (64, 64))).astype(np.uint8)  # scanner noise only
    speck = np.zeros((64, 64), np.uint8)
    speck[:2, :10] = 200  # 20 bright pixels of 4096: under 1%
    brain = np.zeros((64, 64), np.uint8)
    brain[20:40, 20:40] = 120
    got = blank_slices(np.stack([flat, near_flat, speck, brain, np.zeros((64, 64), np.uint8)]))
    assert got.tolist() == [True, True, True, False, True]


# ----------------------------------------------------------------------------- end-of-run failures


def test_symlinked_output_is_written_through(data, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert run_cli(["data", "synth", "--out", link, "--size", "32", "--slices", "3", "--patients", "1"],
                   capsys)[0] == 0
    assert link.is_symlink() and (real / MARKER).is_file() and (real / "data.csv").is_file()
    tlink = tmp_path / "tfds_link"
    (tmp_path / "tfds_real").mkdir()
    tlink.symlink_to(tmp_path / "tfds_real")
    assert run_cli(["data", "build", "--data-dir", data, "--tfds-dir", tlink], capsys)[0] == 0
    assert (tmp_path / "tfds_real" / "lgg_mri" / "1.0.0").is_dir()
    assert temporaries(tmp_path) == [] and temporaries(tmp_path / "tfds_real") == []


def test_unusable_workdir_fails_before_the_build(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    tfds_dir = tmp_path / "t"
    rc, _, err = run_cli(["data", "build", "--data-dir", data, "--tfds-dir", tfds_dir,
                          "--workdir", blocker / "w"], capsys)
    assert rc == 2 and str(blocker / "w") in one_line(err) and not tfds_dir.exists()
    rc, _, _ = run_cli(["data", "build", "--data-dir", data, "--tfds-dir", tfds_dir,
                        "--workdir", tmp_path / "w"], capsys)
    assert rc == 0 and (tfds_dir / "lgg_mri" / "splits.json").read_bytes() == (tmp_path / "w" / "splits.json").read_bytes()


def test_split_does_not_replace_other_splits_unasked(data, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_cli(["data", "split", "--data-dir", data, "--workdir", w], capsys)[0] == 0
    first = (w / "splits.json").read_bytes()
    assert run_cli(["data", "split", "--data-dir", data, "--workdir", w], capsys)[0] == 0  # same splits: fine
    rc, _, err = run_cli(["data", "split", "--data-dir", data, "--workdir", w, "--seed", "5",
                          "--fractions", "0.5", "0.5", "0"], capsys)
    assert rc == 2 and f"{w / 'splits.json'}: already exists" in one_line(err)
    assert (w / "splits.json").read_bytes() == first
    assert run_cli(["data", "split", "--data-dir", data, "--workdir", w, "--seed", "5",
                    "--fractions", "0.5", "0.5", "0", "--overwrite"], capsys)[0] == 0
    assert json.loads((w / "splits.json").read_text())["seed"] == 5


def test_write_error_names_the_users_path(tmp_path, capsys, monkeypatch):
    import errno

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "out"
    rc, _, err = run_cli(["data", "synth", "--out", out, "--size", "32", "--slices", "3", "--patients", "1"], capsys)
    line = one_line(err)
    assert rc == 1 or rc == 2
    assert line.startswith(f"dlvae-jax: error: {out}/TCGA_SY_0001_20000101/") and "No space left" in line
    assert "dlvae-jax-tmp-" not in line and list(tmp_path.iterdir()) == []


def test_concurrent_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with output_folder(out, "data synth") as tmp:
        rc, _, err = run_cli(["data", "synth", "--out", out, "--size", "32", "--slices", "3"], capsys)
        assert rc == 2 and f"another dlvae-jax process (pid {os.getpid()}) is writing it" in one_line(err)
        (tmp / "result.txt").write_text("first")
    assert (out / "result.txt").read_text() == "first"
    with run_folder(tmp_path / "work", "train") as w:
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            with run_folder(tmp_path / "work", "train"):
                pass
        assert w == (tmp_path / "work").resolve()
    assert temporaries(tmp_path) == []


def test_run_folder_rules(tmp_path):
    w = tmp_path / "w"
    with run_folder(w, "train") as folder:
        (folder / "ckpt").write_text("step 1")
    with run_folder(w, "train") as folder:  # resume
        assert (folder / "ckpt").read_text() == "step 1"
    with pytest.raises(OutputError, match="made by `dlvae-jax train`"):
        with run_folder(w, "classical"):
            pass
    with pytest.raises(OutputError, match="pass --overwrite"):
        with run_folder(w, "train", resume=False):
            pass
    with run_folder(w, "train", overwrite=True) as folder:
        assert sorted(p.name for p in folder.iterdir()) == [MARKER]
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep").write_text("x")
    with pytest.raises(OutputError, match="not made by dlvae-jax"):
        with run_folder(user, "train", overwrite=True):
            pass
    assert (user / "keep").read_text() == "x"
    with pytest.raises(RuntimeError):
        with run_folder(tmp_path / "fresh", "train"):
            raise RuntimeError("fails before writing anything")
    assert not (tmp_path / "fresh").exists() and temporaries(tmp_path) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _ours(target: Path, kind: str, pid: int, rest: str = "abc123") -> Path:
    """The name our temporary of `target` would have in process `pid`."""
    return target.parent / (sibling(target, kind).replace(f"-{os.getpid()}-", f"-{pid}-") + rest)


def test_stale_temporaries_are_removed_and_a_cut_swap_restored(tmp_path, capsys):
    dead = _dead_pid()
    out, prev = tmp_path / "out", tmp_path / "prev"
    _ours(out, "tmp", dead).mkdir()
    (_ours(out, "tmp", dead) / "big").write_bytes(b"x" * 1000)
    _ours(out, "tmp", dead, "zz").write_text("{")  # a file temporary (dlvae_jax.io)
    _ours(prev, "old", dead, "q1").mkdir()  # cut off between the two renames of a replacement
    (_ours(prev, "old", dead, "q1") / "summary.json").write_text("{}")
    alive = _ours(out, "tmp", os.getpid(), "x")
    alive.mkdir()
    rc, _, _ = run_cli(["data", "synth", "--out", out, "--size", "32", "--slices", "3", "--patients", "1"], capsys)
    assert rc == 0
    # Only the temporaries of the output written are swept; prev's is another output's business.
    assert temporaries(tmp_path) == sorted([alive.name, _ours(prev, "old", dead, "q1").name])
    assert remove_stale_temporaries(prev) == [] and (prev / "summary.json").read_text() == "{}"
    alive.rmdir()
    assert remove_stale_temporaries(out) == [] and temporaries(tmp_path) == []


def test_the_sweep_touches_nothing_that_is_not_ours(tmp_path, capsys):
    """Entries that merely look like temporaries, other outputs' names and other programs' locks stay."""
    dead = _dead_pid()
    p = tmp_path / "P"
    (p / "backup").mkdir(parents=True)
    (p / ".backup.old-2023-final").mkdir()
    (p / ".backup.old-2023-final" / "thesis.txt").write_text("v1")
    (p / ".notes.tmp-1999-x").write_text("n")
    (p / f".out.tmp-{dead}-abc").mkdir()  # our old naming, or a user's: not recognisably ours
    (p / ".s.PGSQL.5432.lock").write_text(f"{os.getpid()}\n")  # a live process's lock
    (p / ".out.lock").write_text(json.dumps({"pid": dead}))
    (p / ".x.lock").write_text("")
    before = tree_hash(p)
    rc, _, err = run_cli(["data", "synth", "--out", p / "out", "--patients", "2", "--size", "64", "--slices", "3"],
                         capsys)
    assert rc == 0, err
    after = tree_hash(p)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before
    assert temporaries(p) == sorted(k for k in before if "/" not in k and k.startswith("."))
    # A file named like our lock that is not ours is neither truncated nor removed: the write is refused.
    (p / ".other.dlvae-jax.lock").write_text("a user's file")
    rc, _, err = run_cli(["data", "synth", "--out", p / "other", "--patients", "1", "--size", "32", "--slices", "3"],
                         capsys)
    assert rc == 2 and "not a dlvae-jax lock file" in one_line(err)
    assert (p / ".other.dlvae-jax.lock").read_text() == "a user's file" and not (p / "other").exists()
    # Our own lock of a dead process is taken over and gone afterwards.
    lock_path(p / "again").write_text(json.dumps({"program": "dlvae-jax", "pid": dead, "host": "h"}))
    rc, _, err = run_cli(["data", "synth", "--out", p / "again", "--patients", "1", "--size", "32", "--slices", "3"],
                         capsys)
    assert rc == 0, err
    assert not lock_path(p / "again").exists()


def _fake_workdir(tmp_path: Path) -> Path:
    """A training workdir as `train` leaves it: marker, config, its synthetic data, a checkpoint."""
    with run_folder(tmp_path / "W", "train") as w:
        (w / "config.json").write_text("{}")
        synthesize(w / "data", n_patients=2, seed=0, size=32, slices_per_patient=3)  # train does this
        (w / "checkpoints" / "latest" / "1").mkdir(parents=True)
        (w / "checkpoints" / "latest" / "1" / "state").write_text("weights")
    return tmp_path / "W"


def test_overwrite_never_replaces_a_training_workdir_or_anything_in_it(tmp_path, capsys, monkeypatch):
    import dlvae_jax.eval.inference as inference_mod
    import dlvae_jax.eval.predict as predict_mod

    w = _fake_workdir(tmp_path)
    patient = sorted(p for p in (w / "data").iterdir() if p.is_dir())[0]
    ds = tmp_path / "ds"  # a data set outside the workdir
    elsewhere = ds / patient.name
    shutil.copytree(patient, elsewhere)
    for mod in (predict_mod, inference_mod):  # the output is refused before the model is used
        if hasattr(mod, "load_predictor"):
            monkeypatch.setattr(mod, "load_predictor", lambda *a, **k: None)
    before = tree_hash(tmp_path)
    synth = ["--patients", "1", "--size", "32", "--slices", "3", "--overwrite"]
    cases = [
        (["predict", "--workdir", w, "--out", w / "data", "--overwrite", "--quiet", elsewhere], "inside the training"),
        (["predict", "--workdir", w, "--out", w / "checkpoints", "--overwrite", "--quiet", elsewhere], "inside"),
        (["predict", "--workdir", w, "--out", w / "new", "--quiet", elsewhere], "inside the training workdir"),
        (["classical", "--data-dir", ds, "--out", w, "--overwrite", "--quiet"], "is a training workdir"),
        (["classical", "--data-dir", ds, "--out", w / "data", "--overwrite", "--quiet"], "inside"),
        (["data", "synth", "--out", w, *synth], "is a training workdir"),
        (["data", "synth", "--out", w / "data", *synth], "inside the training workdir"),
        (["data", "split", "--data-dir", ds, "--workdir", w / "data", "--overwrite"], "inside"),
    ]
    for args, words in cases:
        rc, _, err = run_cli(args, capsys)
        line = one_line(err)
        assert rc == 2 and words in line and "choose" in line, (args, line)
        assert tree_hash(tmp_path) == before, args
    # --overwrite replaces only an earlier output of the same command.
    c = tmp_path / "c"
    assert run_cli(["data", "synth", "--out", c, *synth], capsys)[0] == 0
    before = tree_hash(tmp_path)
    rc, _, err = run_cli(["classical", "--data-dir", ds, "--out", c, "--overwrite", "--quiet"], capsys)
    assert rc == 2 and "only replaces an earlier output of `dlvae-jax classical`" in one_line(err)
    with pytest.raises(OutputError, match="made by `dlvae-jax data synth`"):
        with run_folder(c, "train", overwrite=True):
            pass
    assert tree_hash(tmp_path) == before
    # ... and never one that has come to hold another dlvae-jax folder, such as a run.
    shutil.move(w, c / "W")
    before = tree_hash(tmp_path)
    rc, _, err = run_cli(["data", "synth", "--out", c, *synth], capsys)
    assert rc == 2 and f"holds {(c / 'W').resolve()}" in one_line(err)
    assert tree_hash(tmp_path) == before


BAD_CONFIGS = {
    "seed_negative": (None, ["train.seed=-1"], "train.seed"),
    "seed_2_64": (None, ["train.seed=18446744073709551616"], "train.seed"),
    "split_seed": (None, ["data.split_seed=4294967296"], "data.split_seed"),
    "fractions_negative": (None, ["data.fractions=(-1.0,1.0,1.0)"], "data.fractions"),
    "fractions_no_train": (None, ["data.fractions=(0.0,0.5,0.5)"], "data.fractions"),
    "fractions_sum": (None, ["data.fractions=(0.5,0.5,0.5)"], "data.fractions"),
    "lr_inf": (None, ["optimizer.learning_rate=1e999"], "optimizer.learning_rate"),
    "lr_huge_int": (None, ["optimizer.learning_rate=1" + "0" * 400], "optimizer.learning_rate"),
    "steps_zero": (None, ["train.steps=0"], "train.steps"),
    "p_flip_above_1": (None, ["augment.p_flip_lr=1.5"], "augment.p_flip_lr"),
    "p_missing_negative": (None, ["augment.p_missing_sequence=-0.1"], "augment.p_missing_sequence"),
    "tversky_one": (None, ["loss.dice_fn_weight=1.0"], "loss.dice_fn_weight"),
    "volume_share_above_1": (None, ["eval.min_volume_share=1.5"], "eval.min_volume_share"),
    "raises": ("def get_config():\n    raise RuntimeError('boom')\n", [], "boom"),
    "returns_none": ("def get_config():\n    return None\n", [], "NoneType"),
    "returns_dict": ("def get_config():\n    return {'train': {'steps': 1}}\n", [], "got dict"),
    "no_steps": ("from dlvae_jax.configs.demo import get_config as demo\n"
                 "def get_config():\n    c = demo()\n    del c.train['steps']\n    return c\n", [], "train.steps"),
    "no_section": ("from dlvae_jax.configs.demo import get_config as demo\n"
                   "def get_config():\n    c = demo()\n    del c['eval']\n    return c\n", [], "eval"),
    "sys_exit_0": ("import sys\nsys.exit(0)\n", [], "sys.exit(0)"),
    "exit_in_get_config": ("import sys\ndef get_config():\n    sys.exit(0)\n", [], "sys.exit(0)"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_is_one_line_before_anything_is_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, overrides, words = BAD_CONFIGS[case]
    config = "demo"
    if text is not None:
        config = tmp_path / f"{case}.py"
        config.write_text(text)
    args = ["train", "--config", config, "--workdir", tmp_path / "w"]
    for item in overrides:
        args += ["--set", item]
    rc, out, err = run_cli(args, capsys)
    line = one_line(err)
    assert rc == 2 and words in line and line.startswith("dlvae-jax: error: "), line
    assert text is None or str(config) in line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("content", ["[1, 2]", "{}", '{"data": {}}', '"text"', "null", '{"train": []}'])
def test_a_config_json_of_the_wrong_shape_is_one_line(content, tmp_path, capsys):
    from dlvae_jax import configs

    w = tmp_path / "w"
    with run_folder(w, "train"):
        (w / "config.json").write_text(content)
    rc, _, err = run_cli(["evaluate", "--workdir", w, "--quiet"], capsys)
    line = one_line(err)
    assert rc == 2 and str(w / "config.json") in line, line
    with pytest.raises(configs.ConfigError, match=r"^x/config.json: "):
        configs.from_json(content, "x/config.json")
    cfg = configs.load("demo")
    assert configs.to_json(configs.from_json(configs.to_json(cfg))) == configs.to_json(cfg)


def test_a_train_that_failed_on_bad_data_leaves_nothing_and_the_retry_runs(tmp_path, capsys, monkeypatch):
    from dlvae_jax.train import loop

    bad = synthesize(tmp_path / "bad", n_patients=2, seed=0, size=32, slices_per_patient=3)
    good = synthesize(tmp_path / "good", n_patients=2, seed=0, size=32, slices_per_patient=3)
    for n in (1, 2):
        (bad / P1 / f"{P1}_{n}.tif").write_bytes(b"not a tiff")
    w = tmp_path / "w"
    args = ["train", "--config", REPO_ROOT / "tests" / "configs" / "tiny.py", "--workdir", w]
    rc, _, err = run_cli(args + ["--data-dir", bad], capsys)
    line = one_line(err)
    assert rc == 2 and str(bad / P1 / f"{P1}_1.tif") in line
    assert "--skip-bad" not in line and "(and 1 more problems)" in line  # train has no --skip-bad
    assert not w.exists() and temporaries(tmp_path) == []
    # The corrected retry (another --data-dir: another config) is not refused: it gets as far as training.
    def reached(cfg, wd, *args, **kwargs):
        assert (wd / "config.json").is_file() and (wd / "splits.json").is_file()
        raise DlvaeError(f"training reached in {wd}")

    monkeypatch.setattr(loop, "_train_in", reached)
    rc, _, err = run_cli(args + ["--data-dir", good], capsys)
    assert rc == 2 and one_line(err) == f"dlvae-jax: error: training reached in {w.resolve()}"
    assert not w.exists()  # failed before its first checkpoint: taken back as well
    # What a failed block of train keeps: everything, once it holds a checkpoint.
    with run_folder(w, "train"):
        (w / "notes.txt").write_text("a user's")
    with pytest.raises(DlvaeError):
        with run_folder(w, "train"):
            (w / "config.json").write_text("{}")
            (w / "checkpoints" / "latest").mkdir(parents=True)  # no save in it yet
            raise DlvaeError("fails before a checkpoint")
    assert sorted(p.name for p in w.iterdir()) == [MARKER, "notes.txt"]
    with pytest.raises(DlvaeError):
        with run_folder(w, "train"):
            (w / "config.json").write_text("{}")
            (w / "checkpoints" / "latest" / "1").mkdir(parents=True)
            (w / "checkpoints" / "latest" / "1" / "state").write_text("weights")
            raise DlvaeError("fails after a checkpoint")
    assert sorted(p.name for p in w.iterdir()) == [MARKER, "checkpoints", "config.json", "notes.txt"]
    # Commands that have --skip-bad still suggest it.
    rc, _, err = run_cli(["data", "check", "--data-dir", bad], capsys)
    assert rc == 2 and "--skip-bad skips bad slices" in one_line(err)


# ----------------------------------------------------------------------------- signals, real processes


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return env


def _start(args, cwd, slow: str | None = None, delay: float = 0.05):
    """Runs the CLI; `slow` ("module:function") makes that function take `delay` s more per call,
    so that a signal reliably lands while the work it belongs to is in progress."""
    code = "import sys\n"
    if slow:
        module, name = slow.split(":")
        # The first call also leaves a file "slow-started" in the working folder,
        # so a test can wait for the work to be under way instead of guessing.
        code += (f"import pathlib, time, {module} as m\nf = m.{name}\n"
                 f"m.{name} = lambda *a, **k: (pathlib.Path('slow-started').touch(), time.sleep({delay}), "
                 f"f(*a, **k))[2]\n")
    code += "from dlvae_jax.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temporary(proc, parent: Path, timeout: float = 60) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = [p for p in parent.iterdir() if ".dlvae-jax-tmp-" in p.name and p.is_dir()]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no temporary folder appeared")


@pytest.mark.parametrize("sig,delay", [(signal.SIGINT, 1.0), (signal.SIGTERM, 0.3), (signal.SIGINT, 0.0)])
def test_signal_during_classical(sig, delay, data, tmp_path):
    before = tree_hash(data)
    out = tmp_path / "out"
    proc = _start(["classical", "--data-dir", data, "--out", out, "--quiet"], tmp_path)
    _wait_for_temporary(proc, tmp_path)
    time.sleep(delay)  # 1 s: inside the XLA compilation
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip() == f"dlvae-jax: interrupted ({signal.Signals(sig).name})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert tree_hash(data) == before


@pytest.mark.parametrize("command", ["data synth", "data build", "data check"])
def test_sigterm_and_sigint_during_data_commands(command, data, tmp_path):
    before = tree_hash(data)
    if command == "data synth":
        args = ["data", "synth", "--out", tmp_path / "s", "--patients", "40", "--size", "128"]
        sig = signal.SIGTERM
    elif command == "data build":
        args = ["data", "build", "--data-dir", data, "--tfds-dir", tmp_path / "t"]
        sig = signal.SIGTERM
    else:
        args = ["data", "check", "--data-dir", data]
        sig = signal.SIGINT
    slow = {"data synth": None, "data build": "dlvae_jax.data.lgg:load_slice",
            "data check": "dlvae_jax.data.lgg:_validate_pair"}[command]
    proc = _start(args, tmp_path, slow, delay=1.0 if command == "data check" else 0.05)
    if command == "data synth":
        _wait_for_temporary(proc, tmp_path)
    elif command == "data build":
        while not (tmp_path / "t").exists():
            time.sleep(0.01)
        _wait_for_temporary(proc, tmp_path / "t")
        time.sleep(0.3)  # TFDS is writing examples
    else:
        while not (tmp_path / "slow-started").exists():  # checking slices in worker threads (1 s each)
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip() == f"dlvae-jax: interrupted ({signal.Signals(sig).name})"
    left = [p for p in tmp_path.rglob("*") if p.name.startswith(".") and p.name != MARKER]
    assert left == [] and tree_hash(data) == before
    assert not (tmp_path / "t" / "lgg_mri").exists() and not (tmp_path / "s").exists()


def test_sigkill_debris_is_removed_by_the_next_run(data, tmp_path, capsys):
    out = tmp_path / "s"
    proc = _start(["data", "synth", "--out", out, "--patients", "40", "--size", "128"], tmp_path)
    tmp = _wait_for_temporary(proc, tmp_path)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert tmp.exists()  # what SIGKILL leaves behind
    rc, _, _ = run_cli(["data", "synth", "--out", out, "--patients", "1", "--size", "32", "--slices", "3"], capsys)
    assert rc == 0 and temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "s"]


# ----------------------------------------------------------------------------- mount points


def _unshare_ok() -> str | None:
    if not shutil.which("unshare"):
        return "unshare is not installed"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs none $d"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()}"


def test_mount_points(data, tmp_path):
    why = _unshare_ok()
    if why:
        print(f"skipped: {why}")
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    py = f"{sys.executable} -m dlvae_jax.cli"
    script = (f"mount -t tmpfs none {mnt} && "
              f"{py} data synth --out {mnt} --patients 1 --size 32 --slices 3; echo synth=$?; "
              f"{py} data build --data-dir {data} --tfds-dir {mnt} >/dev/null; echo build=$?; "
              f"ls -A {mnt}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=120)
    assert "synth=2" in r.stdout and f"{mnt}: is a mount point" in r.stderr  # refused before any work
    assert "build=0" in r.stdout and r.stdout.strip().splitlines()[-1] == "lgg_mri"
