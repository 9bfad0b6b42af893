"""bpf/getsockopt.c leaves every getsockopt it does not answer to the kernel on every kernel.

Before Linux 6.5 a cgroup getsockopt program must set optlen = 0 on each path it does not
answer when the caller's optlen is above PAGE_SIZE, or the call fails with EFAULT (the
kernel test cannot see that on 6.5+). Here the source is checked: every return of the
program goes through mb_pass() except the one right after a successful mb_answer(), and
mb_pass() clears an optlen above a page.
"""

import os
import re

from meshbpf.ebpf import loader

SOURCE = os.path.join(loader.BPF_DIR, "getsockopt.c")


def _code():
    with open(SOURCE) as f:
        text = f.read()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _function(code, name):
    """The body (between the outer braces) of function `name`."""
    m = re.search(r"\b" + name + r"\s*\([^)]*\)\s*\{", code)
    assert m, f"{name} not found in {SOURCE}"
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        i += 1
    return code[m.end():i - 1]


def _returns(body):
    return [(m.start(), m.group(1).strip()) for m in re.finditer(r"\breturn\b([^;]*);", body)]


def test_every_unanswered_path_goes_through_mb_pass():
    code = _code()
    programs = re.findall(r"^int\s+(\w+)\s*\(\s*struct bpf_sockopt\s*\*", code, flags=re.M)
    assert programs == ["mb_getsockopt"]
    body = _function(code, "mb_getsockopt")
    rets = _returns(body)
    passed = [r for r in rets if r[1] == "mb_pass(ctx)"]
    others = [r for r in rets if r[1] != "mb_pass(ctx)"]
    assert len(passed) >= 5, rets
    # the only other return: the answered path, inside `if (mb_answer(...)) { ... }`
    assert len(others) == 1 and others[0][1] == "1", others
    block = body[:others[0][0]]
    opened = block.rindex("{")
    assert re.search(r"if\s*\(\s*mb_answer\(ctx,[^)]*\)\s*\)\s*$", block[:opened]), \
        "the non-mb_pass return must be the answered one"
    assert "}" not in block[opened:]
    # and the function ends by passing (the miss after a failed answer)
    assert body.rstrip().endswith("return mb_pass(ctx);")


def test_mb_pass_clears_an_optlen_above_a_page():
    code = _code()
    assert re.search(r"#define\s+MB_PAGE_SIZE\s+4096\b", code)
    body = _function(code, "mb_pass")
    m = re.search(r"if\s*\(\s*ctx->optlen\s*>\s*MB_PAGE_SIZE\s*\)\s*\{(.*?)\}", body, flags=re.S)
    assert m, body
    # written through volatile (DESIGN.md: clang may merge adjacent ctx stores)
    assert re.search(r"volatile\s+struct\s+bpf_sockopt\s*\*\s*(\w+)\s*=\s*ctx;", m.group(1))
    assert re.search(r"\w+->optlen\s*=\s*0;", m.group(1))
    assert [r for _, r in _returns(body)] == ["1"]


def test_mb_answer_reports_when_it_did_not_answer():
    """mb_answer returns 0 (then the caller passes) on every path that wrote no answer."""
    body = _function(_code(), "mb_answer")
    rets = [r for _, r in _returns(body)]
    assert set(rets) == {"0", "1"}
    for part in body.split("return 1;")[:-1]:
        assert "optlen = sizeof" in part.rsplit("return 0;", 1)[-1]
