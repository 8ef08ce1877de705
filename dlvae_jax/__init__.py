"""dlvae-jax: the DL-VAE-CNN MRI segmentation pipeline in JAX/Flax.

Pipeline (Rao et al., Sections IV-B to IV-E): histogram equalization ->
K-means clustering -> dual-view conditional VAE -> latent-conditioned CNN.
"""

__version__ = "0.1.0"
