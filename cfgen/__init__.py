"""cfgen: counterfactual image datasets by DDIM inversion and anti-causal guidance.

    cfgen run --config pipelines/digits.toml      # invert -> guide -> pack
    cfgen --help

    import cfgen
    stats = cfgen.run("pipelines/digits.toml", out="runs/digits", overrides=["guide.scale=4"])

The Python API (cfgen/api.py) is what the command line calls; importing cfgen loads neither torch
nor diffusers until a stage runs.
"""

__version__ = "0.1.0"

from cfgen.api import guide, invert, load_config, pack, run  # noqa: E402

__all__ = ["__version__", "guide", "invert", "load_config", "pack", "run"]
