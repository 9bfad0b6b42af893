"""Errors a user can cause or fix, each with the exit code the CLI returns for it.

Anything raised as a MeshbpfError is printed as one plain sentence by the CLI; anything
else is a bug and keeps its traceback.
"""


class MeshbpfError(Exception):
    """A failure explained in words; `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint

    def __str__(self):
        msg = super().__str__()
        return f"{msg} ({self.hint})" if self.hint else msg


class UsageError(MeshbpfError):
    """Bad input: an invalid CIDR, port, uid, option combination."""

    exit_code = 2


class AddressInUseError(UsageError):
    """The pod's address is held by another live meshed pod. Refused in every mode: `auto`
    does not fall back to iptables, so nothing changes for either pod."""

    no_fallback = True


class NotFoundError(MeshbpfError):
    """A named netns, cgroup, pid or pod does not exist."""

    exit_code = 3


class UnsupportedError(MeshbpfError):
    """The kernel or the machine lacks a feature the request needs."""

    exit_code = 4


class ApplyError(MeshbpfError):
    """Applying to the kernel failed; whatever was half-applied has been rolled back."""

    exit_code = 5


class PodNotFoundError(NotFoundError):
    """No cgroup for a pod UID on this node (not scheduled here, or not created yet)."""


class PodNotRunningError(NotFoundError):
    """The pod's cgroup exists but none of its processes runs (yet, or any more), so its
    network namespace cannot be read: try again when its sandbox has started."""
