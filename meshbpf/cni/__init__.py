"""The chained CNI plugin (`meshbpf-cni`, a thin client of the agent's socket) and its
install into a node's CNI configuration."""
