"""Datasets: procedural tasks, GSM8K and OpenR1-Math as TFDS array_record builders, read without
TensorFlow."""

from kljax.data import tasks
from kljax.data.builders import FIELDS, Source, batch_indices, load

__all__ = ["FIELDS", "Source", "batch_indices", "load", "tasks"]
