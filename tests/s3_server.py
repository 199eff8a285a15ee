"""The S3 server the tests use: registry/local_s3.py (kept under this name for the tests that import it)."""

from registry.local_s3 import ACCESS_KEY, SECRET_KEY, S3Server, free_ports, seaweedfs, weed_binary

__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Server", "free_ports", "seaweedfs", "weed_binary"]
