"""The two-node Ray cluster the tests use: scoring/local_ray.py (kept under this name for the tests that import
it)."""

from scoring.local_ray import RayCluster, RayNode, ray_cluster

__all__ = ["RayCluster", "RayNode", "ray_cluster"]
