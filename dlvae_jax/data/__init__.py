"""LGG data layer: index/validate the download layout, synthesize phantoms,
patient-level splits, the `lgg_mri` TFDS builder, the grain pipeline and
on-device augmentation.

Heavy modules (TFDS, grain, JAX) are imported lazily by their submodules, so
`import dlvae_jax.data` stays cheap.
"""

from dlvae_jax.data.lgg import LggIndex, SliceRecord, load_arrays, load_slice, scan
from dlvae_jax.data.splits import make_splits, read_splits, write_splits
from dlvae_jax.data.synth import synthesize

__all__ = [
    "LggIndex",
    "SliceRecord",
    "load_arrays",
    "load_slice",
    "make_splits",
    "read_splits",
    "scan",
    "synthesize",
    "write_splits",
]
