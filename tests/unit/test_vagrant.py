"""vagrant/ and the VM tier's shell scripts: the README's VM table names the Vagrantfile's VMs,
`vagrant validate` accepts the Vagrantfile, shellcheck accepts every provisioning/guest script."""

import glob
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAGRANT = os.path.join(REPO, "vagrant")
SCRIPTS = sorted(glob.glob(os.path.join(VAGRANT, "*.sh")) +
                 glob.glob(os.path.join(REPO, "scripts", "vm", "*.sh")) +
                 [os.path.join(REPO, "scripts", "vm", "initramfs-init")])


def vagrantfile_vms(text):
    return re.findall(r'^\s*"([a-z0-9]+)"\s*=>\s*\[', text, re.M)


def readme_vms(text):
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| VM")]
    return [l.split("|")[1].strip() for l in rows]


def test_readme_table_and_vagrantfile_name_the_same_vms():
    vf = vagrantfile_vms(open(os.path.join(VAGRANT, "Vagrantfile")).read())
    readme = readme_vms(open(os.path.join(VAGRANT, "README.md")).read())
    assert len(vf) >= 8 and vf == readme


def test_table_parsers_see_a_mismatch():
    assert readme_vms("| VM | k |\n|--|--|\n| a | 1 |\n") == ["a"]
    assert vagrantfile_vms('  "a" => ["box", "x", "1"],\n  "b" => ["b"],') == ["a", "b"]


def _need(tool):
    if not shutil.which(tool):
        pytest.fail(f"{tool} is not installed (run `make setup`)")


def test_vagrant_validate():
    _need("vagrant")
    proc = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    _need("shellcheck")
    first = open(script).readline()
    shell = "bash" if "bash" in first else "sh"
    proc = subprocess.run(["shellcheck", "-s", shell, script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
