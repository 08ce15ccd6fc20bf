"""Datasets: records, benchmark loaders, manifests, the synthetic generator, transforms, samplers."""

from .market import ReidDataset
from .records import Record
from .registry import load_dataset

__all__ = ["Record", "ReidDataset", "load_dataset"]
