"""Checkpoint -> model bundle (ONNX graphs, manifest, prototype pictures); bundle.py needs no torch."""
