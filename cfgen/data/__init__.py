"""Input datasets: where samples come from (sources) and how their bytes become pixels (images)."""

from cfgen.data.images import ImageDecodeError, decode_image
from cfgen.data.sources import SampleRef, list_samples, load_class_names

__all__ = ["ImageDecodeError", "SampleRef", "decode_image", "list_samples", "load_class_names"]
