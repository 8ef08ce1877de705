"""Shared test fixtures.

The real LGG subset lives beside the repository in ../shared/data/lgg/kaggle_3m
(override with DLVAE_LGG_DIR). Tests that need it skip, with the reason printed,
when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LGG_DIR = Path(os.environ.get("DLVAE_LGG_DIR", REPO_ROOT.parent / "shared" / "data" / "lgg" / "kaggle_3m"))


@pytest.fixture(scope="session")
def lgg_dir() -> Path:
    if not LGG_DIR.is_dir():
        pytest.skip(f"real LGG data not found at {LGG_DIR} (set DLVAE_LGG_DIR to run these tests)")
    return LGG_DIR


# --- LGG data layer fixtures (dlvae_jax.data) ---------------------------------

SYNTH_PATIENTS = 6
SYNTH_SLICES = 12


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the LGG layout: 6 patients x 12 slices, 256x256, seed 0.

    Patients TCGA_SY_0001 .. TCGA_SZ_0006 (institutions alternate SY/SZ); patient
    index 3 (TCGA_SZ_0004) has no tumor. Read-only: copy it before changing it.
    """
    from dlvae_jax.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "lgg", n_patients=SYNTH_PATIENTS, seed=0,
                      size=256, slices_per_patient=SYNTH_SLICES)
