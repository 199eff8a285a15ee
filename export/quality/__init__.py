"""The explanation-quality report every bundle carries (`protoserve report`; export runs it)."""
