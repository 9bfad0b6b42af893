"""The C sources' layout: single-concern headers under bpf/lib/, each address copied by
one helper, no dead definitions. No root, no kernel: the sources are read as text."""

import glob
import os
import re

from meshbpf.ebpf import loader

LIB = os.path.join(loader.BPF_DIR, "lib")


def _read(path):
    with open(path) as f:
        return f.read()


def _headers():
    return sorted(glob.glob(os.path.join(LIB, "*.h")))


def _sources():
    return sorted(glob.glob(os.path.join(loader.BPF_DIR, "*.c"))) + _headers()


def _code(text):
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def test_headers_are_single_concern_files_with_a_guard_and_a_why():
    names = {os.path.basename(h) for h in _headers()}
    assert {"types.h", "maps.h", "counters.h", "addr.h", "policy.h", "conn.h",
            "splice.h", "inbound.h"} <= names
    assert not glob.glob(os.path.join(loader.BPF_DIR, "*.h")), "headers live in bpf/lib/"
    for h in _headers():
        text = _read(h)
        name = os.path.basename(h)
        # opens with a comment that names the file and its one concern, then says why
        assert text.startswith(f"/* {name} — "), name
        assert "Why" in text[:text.index("*/")], name
        guard = "MESHBPF_LIB_" + name[:-2].upper() + "_H"
        assert f"#ifndef {guard}\n#define {guard}\n" in text, name


def test_maps_are_declared_only_where_maps_live():
    for path in _sources():
        name = os.path.relpath(path, loader.BPF_DIR)
        decls = re.findall(r"^\s*(?:BPF_\w+\(|__attribute__\(\(section\(\"maps/)",
                           _code(_read(path)), flags=re.M)
        decls = [d for d in decls if "BPF_ANNOTATE" not in d]
        if name in ("lib/maps.h", "lib/counters.h", "lib/trace.h"):
            assert decls, name
        else:
            assert not decls, f"{name} declares a map"


def test_programs_include_only_lib_headers():
    for path in glob.glob(os.path.join(loader.BPF_DIR, "*.c")):
        for inc in re.findall(r'^\s*#include\s+"([^"]+)"', _read(path), flags=re.M):
            assert inc.startswith("lib/") and os.path.isfile(os.path.join(loader.BPF_DIR, inc)), \
                (path, inc)


def test_the_ipv6_address_is_copied_by_one_helper():
    """No hand-written word-by-word copy of a 16-byte address outside addr.h: every copy
    goes through mb_copy_ip (or the accessors built on it)."""
    word_copy = re.compile(r"\[1\]\s*=\s*[\w>.\-]+\[1\]\s*;")
    for path in _sources():
        if path.endswith(os.path.join("lib", "addr.h")):
            continue
        assert not word_copy.search(_code(_read(path))), path
    addr = _code(_read(os.path.join(LIB, "addr.h")))
    assert len(word_copy.findall(addr)) == 1          # mb_copy_ip itself


def test_family_twins_share_one_body():
    """connect4/6 and sendmsg4/6 keep one hook per file, with the body in lib/outbound.h."""
    for hook, body in (("connect", "mb_connect"), ("sendmsg", "mb_sendmsg")):
        for fam, v6 in (("4", 0), ("6", 1)):
            code = _code(_read(os.path.join(loader.BPF_DIR, f"{hook}{fam}.c")))
            assert re.search(rf"int mb_{hook}{fam}\(struct bpf_sock_addr \*ctx\)\s*\{{\s*"
                             rf"return {body}\(ctx, {v6}\);\s*\}}", code), hook + fam


def test_dead_definitions_are_gone():
    text = "\n".join(_read(p) for p in _sources())
    for dead in ("POD_F_INBOUND_ALL", "HAVE_GETPEERNAME", "MBI_COUNTER_", "mb_is_proxy"):
        assert dead not in text, dead


def test_comments_speak_of_why_not_of_who():
    for path in _sources():
        text = _read(path)
        for talk in (r"\bOwner:", r"inbound helper", r"\bsession\b", r"\bissue \d",
                     r"\bis theirs\b", r"core's"):
            assert not re.search(talk, text), (path, talk)


def test_one_module_inlines_each_header_once(monkeypatch):
    monkeypatch.setattr(loader, "splice_defines", lambda: ["-DMB_TCP_COPIED_SEQ_OFF=8",
                                                           "-DMB_TCP_WRITE_SEQ_OFF=12"])
    text = loader.render_source(splice=True)
    assert _headers()
    assert not re.search(r'^\s*#include\s+"', text, flags=re.M)
    for h in _headers():
        name = os.path.basename(h)
        guard = "MESHBPF_LIB_" + name[:-2].upper() + "_H"
        assert text.count(f"#ifndef {guard}") == 1, name
        assert text.count(f"/* ==== lib/{name} ==== */") == 1, name


def test_a_missing_header_is_a_clear_error(tmp_path):
    import pytest
    from meshbpf.errors import UnsupportedError
    (tmp_path / "connect4.c").write_text('#include "lib/types.h"\nint mb_connect4(void *c) {}\n')
    with pytest.raises(UnsupportedError, match="installation is incomplete"):
        loader.c_text(["connect4.c"], bpf_dir=str(tmp_path))
