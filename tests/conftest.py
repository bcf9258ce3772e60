"""Shared test setup. XLA_FLAGS must be set before JAX is first imported: sharded code is tested on
8 simulated CPU devices. The trainer tests (test_grpo, test_faults) share one prepared dataset and
one warm start per session."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session (child processes inherit it): the trainer,
# notebook and reproduction tests compile the same programs many times over.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kljax-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def sft_dir(data_dir, tmp_path_factory):
  """A short warm start, so rewards vary and every gradient is real (from a random init all
  rewards are 0 and Adam would only amplify rounding noise)."""
  from kljax import models
  from kljax.train.sft import train_sft

  path = str(tmp_path_factory.mktemp("sft"))
  models.export_hf(train_sft(preset="tiny", dataset="arithmetic/level1", data_dir=data_dir,
                             steps=150, progress=False)[0], path)
  return path
