"""The pure parts of upgrading pinned programs: versions, map fingerprints, the layout
check, the meta map's encoding, rewriting map references in instructions."""

import sys

import pytest

from meshbpf import bpfsys
from meshbpf.ebpf import loader, versions
from meshbpf.errors import ApplyError, UsageError

INFO = {"type": 1, "key_size": 8, "value_size": 16, "max_entries": 1024, "flags": 0, "id": 7}


def test_version_changes_with_source_flags_and_meshbpf_version():
    v = versions.program_set_version("int x;", ["-DA"], "0.1.0")
    assert v == versions.program_set_version("int x;", ["-DA"], "0.1.0")
    assert v != versions.program_set_version("int x; ", ["-DA"], "0.1.0")
    assert v != versions.program_set_version("int x;", ["-DA", "-DB"], "0.1.0")
    assert v != versions.program_set_version("int x;", ["-DA"], "0.2.0")


def test_extra_cflags_make_another_version(monkeypatch):
    monkeypatch.delenv(loader.EXTRA_CFLAGS_ENV, raising=False)
    monkeypatch.delenv(loader.MAX_CONNS_ENV, raising=False)
    flags = loader.cflags(splice=False)
    text = loader.render_source(splice=False)
    monkeypatch.setenv(loader.EXTRA_CFLAGS_ENV, "-DMB_UPGRADE_TEST=1")
    flags2 = loader.cflags(splice=False)
    text2 = loader.render_source(splice=False)
    assert flags2 == flags + ["-DMB_UPGRADE_TEST=1"]
    assert "#define MB_UPGRADE_TEST 1" in text2 and "MB_UPGRADE_TEST" not in text
    assert versions.program_set_version(text, flags) != versions.program_set_version(text2, flags2)


@pytest.mark.parametrize("bad", ["-O3", "-DX;rm", "-include /etc/passwd", "-D1X"])
def test_extra_cflags_refuse_anything_but_defines(bad):
    with pytest.raises(UsageError, match=loader.EXTRA_CFLAGS_ENV):
        loader.extra_cflags({loader.EXTRA_CFLAGS_ENV: bad})


def test_fingerprint_has_kernel_fields_and_a_layout_hash():
    fp = versions.map_fingerprint(INFO, '["key"]', '["leaf", [["a", "int"]]]')
    assert {k: fp[k] for k in INFO if k != "id"} == {k: v for k, v in INFO.items() if k != "id"}
    assert "id" not in fp
    other = versions.map_fingerprint(INFO, '["key"]', '["leaf", [["b", "int"]]]')
    assert fp["layout"] != other["layout"]
    assert "layout" not in versions.map_fingerprint(INFO)


def test_same_layouts_pass_new_and_dropped_maps_are_not_problems():
    a = versions.map_fingerprint(INFO, "k", "v")
    assert versions.compare_layouts({"pods": a, "old_only": a},
                                  {"pods": dict(a), "new_only": a}) == []


def test_grown_max_entries_is_refused_with_the_reason():
    a = versions.map_fingerprint(INFO, "k", "v")
    b = dict(a, max_entries=2048)
    [(name, why)] = versions.compare_layouts({"orig_dst": a}, {"orig_dst": b})
    assert name == "orig_dst" and "max_entries 1024 -> 2048" in why and "resized" in why


def test_changed_struct_layout_is_refused_even_with_the_same_sizes():
    a = versions.map_fingerprint(INFO, "k", '["pod_config", [["a","int"],["b","int"]]]')
    b = versions.map_fingerprint(INFO, "k", '["pod_config", [["b","int"],["a","int"]]]')
    [(name, why)] = versions.compare_layouts({"pods": a}, {"pods": b})
    assert name == "pods" and "struct" in why


def test_value_size_change_is_refused_and_unknown_layout_not_compared():
    legacy = versions.map_fingerprint(INFO)                     # pinned before versions
    new = versions.map_fingerprint(INFO, "k", "v")
    assert versions.compare_layouts({"pods": legacy}, {"pods": new}) == []
    [(_, why)] = versions.compare_layouts({"pods": legacy},
                                        {"pods": dict(new, value_size=24)})
    assert why.startswith("value_size 16 -> 24")


def test_meta_round_trip_and_garbage():
    meta = {"version": "abc", "maps": {"pods": versions.map_fingerprint(INFO, "k", "v")}}
    raw = versions.encode_meta(meta)
    assert len(raw) == versions.META_VALUE_SIZE
    assert versions.decode_meta(raw) == meta
    assert versions.decode_meta(bytes(versions.META_VALUE_SIZE)) == {}
    assert versions.decode_meta(None) == {}
    with pytest.raises(ApplyError, match="does not fit"):
        versions.encode_meta({"x": "y" * versions.META_VALUE_SIZE})


def test_patch_map_fds_rewrites_only_map_references():
    code = bpfsys.assemble([
        bpfsys.ld_map_fd(1, 5),                  # map 5 -> 42
        bpfsys.mov64_imm(2, 5),                  # an immediate 5, not a map
        bpfsys.ld_map_fd(3, 6),                  # map 6: not in the map -> unchanged
        bpfsys.insn(bpfsys.BPF_LD_IMM64, dst=4, src=0, imm=5) + bpfsys.insn(0),  # a constant
        bpfsys.exit(),
    ])
    out, n = versions.patch_map_fds(code, {5: 42})
    assert n == 1 and len(out) == len(code)
    assert out[:16] == bpfsys.ld_map_fd(1, 42)
    assert out[16:] == code[16:]
    assert int.from_bytes(out[4:8], sys.byteorder) == 42
