"""cfgen: counterfactual image datasets by DDIM inversion and anti-causal guidance.

    cfgen run --config pipelines/digits.toml      # invert -> guide -> pack
    cfgen --help
"""

__version__ = "0.1.0"
