"""Datasets: procedural tasks, GSM8K and OpenR1-Math as TFDS array_record builders, read without
TensorFlow."""

from kljax.data import tasks
from kljax.data.builders import FIELDS, DataError, Source, batch_indices, load

__all__ = ["DataError", "FIELDS", "Source", "batch_indices", "load", "tasks"]
