"""Speed benchmarks of muse_jax against its peers (README: "Benchmarks")."""
