"""The predict-and-explain service (BentoML, ONNX Runtime); imports no torch."""
