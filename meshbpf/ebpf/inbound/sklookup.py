"""The pod's sk_lookup link: mb_sk_lookup attached to the pod's netns, pinned. Side effects.

A SYN that meets a TIME_WAIT of the same 4-tuple cannot be assigned by tc (the listener's
request socket would duplicate the TIME_WAIT and be dropped until it expires); the
kernel's TIME_WAIT handling asks the netns's sk_lookup programs instead, so each enrolled
pod gets mb_sk_lookup linked in its netns. The link is pinned at
`<pin prefix>/links/sk_lookup-<netns cookie>` so that it outlives the process that made
it and a later detach (or `meshbpf cleanup`) finds it by name (a cookie, unlike a netns
inode, is never reused by a later netns); `bpfsys.unpin_link` removes
it.
"""

import os

from ... import bpfsys

LINK_PREFIX = "sk_lookup-"              # <pin prefix>/links/sk_lookup-<netns cookie>


def link_path(pin_prefix, netns_cookie):
    """Where the pod's sk_lookup link is pinned."""
    return os.path.join(pin_prefix, "links", f"{LINK_PREFIX}{netns_cookie}")


def link(pod, prog_fd, path):
    """Link mb_sk_lookup to the pod's netns and pin the link at `path`; True if made now,
    False if it was there (a re-attach)."""
    if os.path.exists(path):
        return False
    nsfd = os.open(pod.netns, os.O_RDONLY)
    try:
        lfd = bpfsys.link_create(prog_fd, nsfd, bpfsys.BPF_SK_LOOKUP)
    finally:
        os.close(nsfd)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        bpfsys.obj_pin(lfd, path)
    finally:
        os.close(lfd)
    return True
