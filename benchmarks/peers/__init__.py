"""PyTorch peers (diffusers aMUSEd, lucidrains muse-maskgit-pytorch).

Runs in its own virtual environment (benchmarks/peers/requirements.txt);
nothing here imports JAX or muse_jax.
"""
