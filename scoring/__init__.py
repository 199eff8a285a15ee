"""Batch scoring jobs (`protoserve score`, /score_batch): inputs, rows, resumable jobs, engines; no torch."""
