"""protoserve: train, explain and serve prototype networks."""

__version__ = "0.1.0"
