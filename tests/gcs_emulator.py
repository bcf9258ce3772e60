"""`gcp-storage-emulator`, with the one header of real GCS that TensorStore needs and it lacks.

  python tests/gcs_emulator.py start --host 127.0.0.1 --port PORT --in-memory --default-bucket B

Real GCS answers a media download with `x-goog-generation` (the object's generation); the emulator
(2026.7) does not. TensorStore's OCDBT driver, which orbax uses for checkpoints, reads that header
to tell which version of its manifest it read, and without it fails with "Malformed
StorageGeneration" as soon as a checkpoint holds more than a few arrays. This wrapper adds the
header (and `x-goog-metageneration`) to downloads and changes nothing else. The emulator still does
not enforce `ifGenerationMatch` preconditions, which real GCS does; kljax does not rely on them.

It also exits when the process that started it does (pytest killed without its teardown).
"""

import os
import sys
import threading
import time

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    obj = None
  if obj is not None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # objects.get looks it up at each call

def _exit_with_parent(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(1)
  os._exit(0)


if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main

  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
  sys.exit(main())
