"""What an agent under test reads and listens on, made as operators make them: a free
loopback port for its metrics, and the pods file written atomically (a temp file renamed
over it, as an operator's tool or the kubelet's ConfigMap update does). Shared by
`meshbpf bench agent` and the kernel tests that run `meshbpf daemon`."""

import json
import os
import socket


def free_port():
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pods_document(entries):
    """The pods file's document (`meshbpf daemon --pods-file`)."""
    return {"pods": list(entries)}


def write_pods(path, entries):
    """The pods file at `path`, renamed over whatever was there."""
    tmp = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(pods_document(entries), f)
    os.replace(tmp, path)
