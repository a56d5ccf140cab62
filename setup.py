"""Installs muse_jax: the JAX/Flax NNX re-creation of Muse (arXiv 2301.00704)."""

import setuptools

setuptools.setup(
    name="muse_jax",
    version="0.1.0",
    description="Muse text-to-image masked transformers in JAX/Flax NNX.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["muse_jax", "muse_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array-record>=0.8.6",
        # tensorflow-datasets is used for its builder and array_record data
        # sources only; it does not pull in TensorFlow.
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1.0",
        "absl-py>=2.1.0",
        "numpy>=2.0",
        "safetensors>=0.8.0",
        "tokenizers>=0.23.0",
        # T5's tokenizer (text_encoders.t5_tokenizer).
        "sentencepiece>=0.2.0",
        # T5X checkpoints (zarr arrays); orbax-checkpoint already needs it.
        "tensorstore>=0.1.60",
        "pillow>=10.0",
        "scipy>=1.11",
        # Photographs for the tokenizer's real-image benchmark (data.photos).
        "scikit-image>=0.26",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6",
        # The evaluation sweep's trade-off plot (muse_jax.eval).
        "matplotlib>=3.9",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5"],
        # Optional TensorFlow-backed input pipelines (tf.data, seqio tasks).
        "data": ["tensorflow>=2.18", "seqio>=0.0.19"],
    },
)
