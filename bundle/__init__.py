"""A model bundle without torch: its schema, reader and verifier (manifest), ONNX Runtime sessions
(runtime), output-restricted graphs (subgraph), the BentoML model store (store), and how two quality
reports differ (quality_changes)."""
