"""Input datasets: the sources (base.py, sources.py and one module per source) and image decoding (images.py)."""

from cfgen.data.base import CausalModel, SampleRef, Source
from cfgen.data.sources import SOURCES, list_samples, load_class_names, open_source

__all__ = ["SOURCES", "CausalModel", "SampleRef", "Source", "list_samples", "load_class_names", "open_source"]
