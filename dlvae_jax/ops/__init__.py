"""The classical stages of the pipeline as pure, jitted JAX functions."""

from dlvae_jax.ops.histogram import equalization_lut, equalize_hist
from dlvae_jax.ops.kmeans import KMeansImageResult, KMeansResult, kmeans, kmeans_image, kmeans_plusplus

__all__ = [
    "equalize_hist",
    "equalization_lut",
    "KMeansResult",
    "KMeansImageResult",
    "kmeans",
    "kmeans_image",
    "kmeans_plusplus",
]

from dlvae_jax.ops.roi import connected_components, largest_component, remove_small_components, roi_from_clusters

__all__ += ["connected_components", "largest_component", "remove_small_components", "roi_from_clusters"]

from dlvae_jax.ops.classical import ClassicalResult, classical_stages
from dlvae_jax.ops.roi import dilate, erode

__all__ += ["ClassicalResult", "classical_stages", "dilate", "erode"]
