"""airysort's neural networks in JAX/Flax NNX: ResNet classifier, β-TCVAE, training,
inference and Grad-CAM++. Nothing here imports Dask or Zarr except ``data.py``."""
