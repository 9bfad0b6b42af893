"""The deploy/ manifests as a cluster would get them: `kubectl kustomize deploy/base`, or,
where kubectl is missing, a small loader of the same kustomization (the resources it lists,
its namespace and its image tags; tests/unit/test_deploy.py holds the loader to kubectl's
output where both exist). Used by the manifest tests and by the image test, which runs the
agent with the DaemonSet's mounts and capabilities."""

import os
import shutil
import subprocess

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "deploy", "base")
# Kinds the namespace transformer leaves alone (cluster-scoped).
CLUSTER_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}


def kubectl_render(base=BASE):
    out = subprocess.run(["kubectl", "kustomize", base], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {base} failed: {out.stderr}")
    return out.stdout


def _image(ref, images):
    for im in images:
        name = im["name"]
        if ref == name or ref.startswith(name + ":") or ref.startswith(name + "@"):
            return (im.get("newName", name) + ":" + str(im["newTag"])) if "newTag" in im \
                else im.get("newName", name)
    return ref


def load(base=BASE):
    """The kustomization's resources with its namespace and images applied (no kubectl)."""
    with open(os.path.join(base, "kustomization.yaml")) as f:
        kz = yaml.safe_load(f)
    unknown = set(kz) - {"apiVersion", "kind", "namespace", "resources", "images"}
    if unknown:
        raise AssertionError(f"the loader does not know kustomization fields {sorted(unknown)}")
    ns, images, docs = kz.get("namespace"), kz.get("images", []), []
    for res in kz["resources"]:
        with open(os.path.join(base, res)) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        if ns and d["kind"] == "Namespace":
            d["metadata"]["name"] = ns
        elif ns and d["kind"] not in CLUSTER_KINDS:
            d["metadata"]["namespace"] = ns
        if ns and d["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            for s in d.get("subjects", []):
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = ns
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            c["image"] = _image(c["image"], images)
    return docs


def render(base=BASE):
    """(docs, text): kubectl's rendering where kubectl exists, else the loader's."""
    if shutil.which("kubectl"):
        text = kubectl_render(base)
        return [d for d in yaml.safe_load_all(text) if d], text
    docs = load(base)
    return docs, yaml.safe_dump_all(docs, sort_keys=False)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def daemonset(docs):
    (ds,) = by_kind(docs, "DaemonSet")
    return ds
