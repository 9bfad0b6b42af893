"""Kubernetes: pod objects, their meshing, their place on the node."""
