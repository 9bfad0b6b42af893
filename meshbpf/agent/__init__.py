"""The node agent: pod sources, the reconcile loop, metrics and health."""
