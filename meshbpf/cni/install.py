"""Install meshbpf-cni on a node, and remove it again, as istio-cni's install-cni does:
the plugin goes into the runtime's plugin directory (/opt/cni/bin) and a
{"type": "meshbpf-cni", ...} entry is chained at the end of the node's network
configuration (/etc/cni/net.d): the first configuration file by name, the one the runtime
uses. A plain .conf (or .json) is converted to a .conflist of one plugin first, as
install-cni converts it. Both steps are idempotent: a second install writes nothing.

The plugin file is meshbpf/cni/plugin.py itself (it needs nothing but Python's standard
library) with a `#!PYTHON -I` line: the node runs it with its own Python 3, not the
agent's (the agent may run in a container whose files the node cannot see).

Uninstall removes both: the plugin file, and the entry from every configuration that
has it. The file install changed is restored byte for byte from the copy install kept
(`NAME.meshbpf-orig`, an extension no runtime reads), unless something else has changed
the file since (then only our entry is removed); a converted .conf comes back as it was.

`plan_install` and `plan_uninstall` are pure (file names and bytes in, writes and removals
out); `install` and `uninstall` read the directories and apply the plan with atomic renames.
"""

import json
import os

from ..errors import MeshbpfError, NotFoundError, UsageError

PLUGIN_TYPE = "meshbpf-cni"
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
BACKUP_SUFFIX = ".meshbpf-orig"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_PYTHON = "/usr/bin/python3"


# ---- pure ---------------------------------------------------------------------------------

def plugin_entry(agent_socket=None, fail_open=False, log_level=None, log_file=None, timeout=None):
    """The chained plugin's configuration entry (only the keys that differ from defaults)."""
    entry = {"type": PLUGIN_TYPE}
    for key, value in (("agent_socket", agent_socket), ("log_level", log_level),
                       ("log_file", log_file), ("timeout", timeout)):
        if value is not None:
            entry[key] = value
    if fail_open:
        entry["fail_open"] = True
    return entry


def launcher_text(plugin_source, python=DEFAULT_PYTHON):
    """The installed plugin: the plugin module's source run by `python` (isolated mode: no
    PYTHON* variable or user site of the runtime's environment changes what it runs)."""
    if not python.startswith("/"):
        raise UsageError(f"--python {python!r} must be an absolute path on the node")
    lines = plugin_source.split("\n")
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    return f"#!{python} -I\n" + "\n".join(lines)


def conf_files(names):
    """The network configuration files of a directory listing, in the runtime's order."""
    return sorted(n for n in names if n.endswith(CONF_EXTENSIONS) and not n.startswith("."))


def dumps(doc):
    return (json.dumps(doc, indent=2) + "\n").encode()


def _load(name, data):
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise UsageError(f"{name} is not JSON: {e}")
    if not isinstance(doc, dict):
        raise UsageError(f"{name} is not a CNI network configuration (not a JSON object)")
    return doc


def to_conflist(conf):
    """A single-plugin .conf as a conflist (name and cniVersion move to the list)."""
    plugin = {k: v for k, v in conf.items() if k not in ("name", "cniVersion")}
    out = {"cniVersion": conf.get("cniVersion", "0.3.1"), "name": conf.get("name"),
           "plugins": [plugin]}
    return out


def chained(conflist, entry):
    """`conflist` with `entry` as its last plugin and no other meshbpf-cni entry."""
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list):
        raise UsageError('the network configuration list has no "plugins" list')
    others = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    return dict(conflist, plugins=others + [entry])


def unchained(conflist):
    plugins = conflist.get("plugins") if isinstance(conflist.get("plugins"), list) else []
    return dict(conflist, plugins=[p for p in plugins
                                   if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)])


def has_entry(doc):
    return isinstance(doc.get("plugins"), list) and any(
        isinstance(p, dict) and p.get("type") == PLUGIN_TYPE for p in doc["plugins"])


def _converted_name(name):
    stem, ext = os.path.splitext(name)
    return name + "list" if ext == ".conf" else stem + ".conflist"


def plan_install(files, entry):
    """(writes {name: bytes}, removes [name]) that chain `entry` into the node's network
    configuration. `files`: {name: bytes} of the configuration directory."""
    names = conf_files(files)
    if not names:
        raise NotFoundError("no CNI network configuration (.conf, .conflist, .json) to chain into",
                            hint="install the node's network plugin first")
    first = names[0]
    doc = _load(first, files[first])
    writes, removes = {}, []
    if isinstance(doc.get("plugins"), list):
        target, new = first, chained(doc, entry)
    else:
        if not doc.get("type"):
            raise UsageError(f"{first} has neither \"plugins\" nor \"type\": not a CNI configuration")
        target, new = _converted_name(first), chained(to_conflist(doc), entry)
        removes.append(first)
    from .plugin import SUPPORTED_VERSIONS
    if new.get("cniVersion") not in SUPPORTED_VERSIONS:
        # chained into it, meshbpf-cni would fail every pod's ADD
        raise UsageError(f"{first} has cniVersion {new.get('cniVersion')!r}; meshbpf-cni "
                         f"speaks {', '.join(SUPPORTED_VERSIONS)}")
    if new == doc and target == first:
        return {}, []                            # already chained exactly so: nothing to write
    backup = first + BACKUP_SUFFIX
    if backup not in files and not has_entry(doc):
        writes[backup] = files[first]            # the node's own file, as it was
    writes[target] = dumps(new)
    return writes, removes


def plan_uninstall(files):
    """(writes, removes) that take every meshbpf-cni entry out of the configuration
    directory `files` ({name: bytes}), restoring what install changed."""
    writes, removes = {}, []
    backups = {n[:-len(BACKUP_SUFFIX)]: n for n in files if n.endswith(BACKUP_SUFFIX)}
    handled = set()
    for orig, bname in sorted(backups.items()):
        removes.append(bname)
        data = files[bname]
        try:
            odoc = _load(orig, data)
        except UsageError:
            continue
        target = orig if isinstance(odoc.get("plugins"), list) else _converted_name(orig)
        if target not in files:
            continue
        try:
            cur = _load(target, files[target])
        except UsageError:
            continue
        handled.add(target)
        expected = odoc if target == orig else to_conflist(odoc)
        if unchained(cur) == unchained(expected):
            if target != orig:
                removes.append(target)
            writes[orig] = data                  # nothing else changed it: the original bytes
        elif has_entry(cur):
            writes[target] = dumps(unchained(cur))
    for name in conf_files(files):
        if name in handled or name in writes:
            continue
        try:
            doc = _load(name, files[name])
        except UsageError:
            continue
        if has_entry(doc):
            writes[name] = dumps(unchained(doc))
    return writes, removes


# ---- side effects -------------------------------------------------------------------------

def _read_dir(conf_dir):
    if not os.path.isdir(conf_dir):
        raise NotFoundError(f"CNI configuration directory {conf_dir} does not exist")
    files = {}
    for n in os.listdir(conf_dir):
        p = os.path.join(conf_dir, n)
        if (n.endswith(CONF_EXTENSIONS) or n.endswith(BACKUP_SUFFIX)) and os.path.isfile(p):
            with open(p, "rb") as f:
                files[n] = f.read()
    return files


def _write_atomic(path, data, mode=0o644):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _apply(conf_dir, writes, removes):
    # the new files first, then the old ones go: the runtime never sees no network
    for name in sorted(writes, key=lambda n: n.endswith(BACKUP_SUFFIX), reverse=True):
        _write_atomic(os.path.join(conf_dir, name), writes[name])
    for name in removes:
        try:
            os.unlink(os.path.join(conf_dir, name))
        except FileNotFoundError:
            pass


def plugin_source():
    from . import plugin
    path = plugin.__file__
    with open(path) as f:
        return f.read()


def install(bin_dir=DEFAULT_BIN_DIR, conf_dir=DEFAULT_CONF_DIR, python=DEFAULT_PYTHON, **entry):
    """Copy the plugin into `bin_dir` and chain it into `conf_dir`'s network; returns what
    changed: {"plugin", "plugin_changed", "written", "removed"}."""
    if not os.path.isdir(bin_dir):
        raise NotFoundError(f"CNI plugin directory {bin_dir} does not exist")
    if not os.path.isfile(python):
        raise UsageError(f"--python {python} does not exist here",
                         hint="give the node's Python 3 interpreter")
    files = _read_dir(conf_dir)
    writes, removes = plan_install(files, plugin_entry(**entry))   # checks before any write
    text = launcher_text(plugin_source(), python).encode()
    target = os.path.join(bin_dir, PLUGIN_TYPE)
    try:
        with open(target, "rb") as f:
            same = f.read() == text and os.access(target, os.X_OK)
    except OSError:
        same = False
    try:
        if not same:
            _write_atomic(target, text, 0o755)
        _apply(conf_dir, writes, removes)
    except OSError as e:
        raise MeshbpfError(f"installing meshbpf-cni failed: {e.strerror}: {e.filename}")
    return {"plugin": target, "plugin_changed": not same, "written": sorted(writes),
            "removed": sorted(removes)}


def uninstall(bin_dir=DEFAULT_BIN_DIR, conf_dir=DEFAULT_CONF_DIR):
    """Remove the plugin file and every meshbpf-cni entry; returns what changed."""
    target = os.path.join(bin_dir, PLUGIN_TYPE)
    writes, removes = plan_uninstall(_read_dir(conf_dir)) if os.path.isdir(conf_dir) else ({}, [])
    try:
        _apply(conf_dir, writes, removes)
        removed_plugin = os.path.lexists(target)
        if removed_plugin:
            os.unlink(target)
    except OSError as e:
        raise MeshbpfError(f"uninstalling meshbpf-cni failed: {e.strerror}: {e.filename}")
    return {"plugin": target, "plugin_changed": removed_plugin, "written": sorted(writes),
            "removed": sorted(removes)}
