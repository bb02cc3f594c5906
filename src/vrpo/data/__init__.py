"""Data: in-memory image sets and a step-keyed, resumable batch order."""

from vrpo.data.datasets import (
    DATASETS,
    DataError,
    ImageSet,
    balanced_subset,
    load_dataset,
    load_split,
    model_inputs,
    pixel_resolution,
    read_idx,
)
from vrpo.data.order import batch_indices, data_position, keyed_generator, step_generator

__all__ = [
    "DATASETS",
    "DataError",
    "ImageSet",
    "balanced_subset",
    "batch_indices",
    "data_position",
    "keyed_generator",
    "load_dataset",
    "load_split",
    "model_inputs",
    "pixel_resolution",
    "read_idx",
    "step_generator",
]
