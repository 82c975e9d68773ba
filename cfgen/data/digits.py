"""`digits`: scikit-learn's 1,797 real handwritten digits (8x8 grayscale), shipped inside the package.

    [data]
    source = "digits"      # pipelines/digits.toml; image_size = 8, channels = 1
"""

from __future__ import annotations

import numpy as np

from cfgen.data.base import SampleRef, Source
from cfgen.errors import ConfigError


class DigitsSource(Source):
    name = "digits"

    def class_names(self) -> list[str]:
        return [str(i) for i in range(10)]

    def samples(self, classes: list[str]) -> list[SampleRef]:
        from sklearn.datasets import load_digits  # ships the data inside the package

        if self.cfg.data.image_size != 8 or self.cfg.data.channels != 1:
            raise ConfigError("data: the digits source is 8x8 grayscale (image_size=8, channels=1)")
        bunch = load_digits()
        # 0..16 intensities -> 0..255, once, so the factual PNG is exactly what is inverted.
        images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        return [SampleRef(id=f"digits-{i:05d}", label=int(label), origin=f"digits:{i}",
                          load=(lambda a=img: a[:, :, None].copy()))
                for i, (img, label) in enumerate(zip(images, bunch.target))]
