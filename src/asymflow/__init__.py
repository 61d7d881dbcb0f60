"""asymflow: private deep learning with asymmetric flows and partition-amplified accounting."""

__version__ = "0.1.0"
