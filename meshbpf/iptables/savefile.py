"""Pure iptables-save reasoning: parse a dump, find meshbpf's part, diff it, plan restores.

meshbpf owns, per table, every `ISTIO_*` chain and, in the built-in chains, the rules
its payload put there (the jumps into ISTIO_* chains, interface RETURNs, TPROXY marks).
Given what a netns holds now (`current`, parsed from iptables-save) and what it should
hold (`target`, the payload as the same iptables backend spells it back), this module
says whether they agree (`drift`), and writes the single `iptables-restore --noflush`
input that moves one to the other (`transition_payload`) or removes meshbpf's part
(`cleanup_payload`). Each table's changes sit inside one COMMIT, which iptables applies
atomically, so no packet sees a half-updated table.

No side effects: text in, text out.
"""

import dataclasses
import re

from .rules import BUILTIN_CHAINS, CHAIN_PREFIX

_COUNTERS = re.compile(r"^\[\d+:\d+\]\s*")


@dataclasses.dataclass
class Table:
    policies: dict = dataclasses.field(default_factory=dict)    # built-in chain -> policy
    chains: list = dataclasses.field(default_factory=list)      # user chains, in order
    rules: list = dataclasses.field(default_factory=list)       # (chain, spec) in order

    def chain_rules(self, chain):
        return [spec for c, spec in self.rules if c == chain]

    def is_empty(self):
        """Only built-in chains, all ACCEPT, no rules: what an untouched table looks like."""
        return (not self.chains and not self.rules
                and all(p == "ACCEPT" for p in self.policies.values()))


def parse_save(text):
    """iptables-save output -> {table: Table}. Comments and counters are dropped."""
    tables = {}
    cur = None
    for raw in text.splitlines():
        line = _COUNTERS.sub("", raw.strip())
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), Table())
            continue
        if cur is None:
            continue
        if line.startswith(":"):
            parts = line[1:].split()
            name = parts[0]
            policy = parts[1] if len(parts) > 1 else "-"
            if name in BUILTIN_CHAINS:
                cur.policies[name] = policy
            elif name not in cur.chains:
                cur.chains.append(name)
            continue
        if line.startswith("-A "):
            parts = line.split(None, 2)
            cur.rules.append((parts[1], parts[2] if len(parts) > 2 else ""))
    return tables


def normalized(text):
    """A comparable form of a dump: per non-empty table, sorted chains and ordered rules.

    Empty tables (no user chains, no rules, ACCEPT policies) are dropped: iptables
    cannot unload a table once used, so "table present but empty" equals "absent".
    """
    out = {}
    for name, t in parse_save(text).items():
        if t.is_empty():
            continue
        out[name] = {"policies": dict(sorted(t.policies.items())), "chains": sorted(t.chains),
                     "rules": list(t.rules)}
    return out


def _jumps_to_ours(spec):
    m = re.search(r"(?:^|\s)-j\s+(\S+)", spec)
    return bool(m and m.group(1).startswith(CHAIN_PREFIX))


def ours(current, target=None, recorded=None):
    """meshbpf's part of `current`: {table: {"chains": {name: [specs]}, "builtin": [(chain, spec)]}}.

    Built-in-chain rules count as ours when they jump to an ISTIO_* chain, or equal a
    rule of `target` (parsed) or of `recorded` ({table: [(chain, spec)]}) in that chain.
    """
    known = {}
    for tname, t in (target or {}).items():
        for chain, spec in t.rules:
            if chain in BUILTIN_CHAINS:
                known.setdefault(tname, set()).add((chain, spec))
    for tname, pairs in (recorded or {}).items():
        for chain, spec in pairs:
            known.setdefault(tname, set()).add((chain, spec))
    out = {}
    for tname, t in current.items():
        chains = {c: t.chain_rules(c) for c in t.chains if c.startswith(CHAIN_PREFIX)}
        builtin = [(c, s) for c, s in t.rules if c in BUILTIN_CHAINS
                   and (_jumps_to_ours(s) or (c, s) in known.get(tname, ()))]
        if chains or builtin:
            out[tname] = {"chains": chains, "builtin": builtin}
    return out


def wanted(target):
    """The same shape as `ours`, for the target dump (everything in it is ours)."""
    out = {}
    for tname, t in target.items():
        chains = {c: t.chain_rules(c) for c in t.chains}
        builtin = [(c, s) for c, s in t.rules if c in BUILTIN_CHAINS]
        if chains or builtin:
            out[tname] = {"chains": chains, "builtin": builtin}
    return out


def drift(current, target, recorded=None):
    """Human-readable differences between meshbpf's part of `current` and `target`; [] if none."""
    have = ours(current, target, recorded)
    want = wanted(target)
    diffs = []
    for tname in sorted(set(have) | set(want)):
        h = have.get(tname, {"chains": {}, "builtin": []})
        w = want.get(tname, {"chains": {}, "builtin": []})
        for chain in sorted(set(w["chains"]) - set(h["chains"])):
            diffs.append(f"{tname}: chain {chain} is missing")
        for chain in sorted(set(h["chains"]) - set(w["chains"])):
            diffs.append(f"{tname}: chain {chain} is not expected")
        for chain in sorted(set(h["chains"]) & set(w["chains"])):
            if h["chains"][chain] != w["chains"][chain]:
                diffs.append(f"{tname}: chain {chain} differs: " + _list_diff(h["chains"][chain],
                                                                               w["chains"][chain]))
        for chain in BUILTIN_CHAINS:
            hb = [s for c, s in h["builtin"] if c == chain]
            wb = [s for c, s in w["builtin"] if c == chain]
            if hb != wb:
                diffs.append(f"{tname}: built-in chain {chain} differs: " + _list_diff(hb, wb))
    return diffs


def _list_diff(have, want):
    missing = [s for s in want if s not in have]
    extra = [s for s in have if s not in want]
    parts = []
    if missing:
        parts.append("missing " + "; ".join(f"'{s}'" for s in missing))
    if extra:
        parts.append("unexpected " + "; ".join(f"'{s}'" for s in extra))
    return ", ".join(parts) or "rules out of order"


def has_ours(current, recorded=None):
    return bool(ours(current, None, recorded))


def payload_sections(payload):
    """Split a restore payload into {table: [lines between '*table' and COMMIT]}, in order."""
    sections = {}
    cur = None
    for line in payload.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("*"):
            cur = sections.setdefault(s[1:].strip(), [])
        elif s == "COMMIT":
            cur = None
        elif cur is not None:
            cur.append(s)
    return sections


def transition_payload(current, payload, target, recorded=None):
    """One restore input that replaces meshbpf's part of `current` by `payload`'s.

    Per table, inside one COMMIT: existing ISTIO_* chains are flushed (new ones
    created), meshbpf's old built-in-chain rules deleted, chains no longer wanted
    deleted, then the payload's rules added. Other software's rules are untouched.
    """
    have = ours(current, target, recorded)
    sections = payload_sections(payload)
    out = []
    for tname in sorted(set(have) | set(sections)):
        h = have.get(tname, {"chains": {}, "builtin": []})
        existing = set(current[tname].chains) if tname in current else set()
        lines = [f"*{tname}"]
        new_chains = [ln.split()[1] for ln in sections.get(tname, []) if ln.startswith("-N ")]
        for chain in new_chains:
            lines.append(f"-F {chain}" if chain in existing else f"-N {chain}")
        stale = [c for c in h["chains"] if c not in new_chains]
        lines += [f"-F {c}" for c in stale]
        lines += [f"-D {c} {s}" for c, s in h["builtin"]]
        lines += [f"-X {c}" for c in stale]
        lines += [ln for ln in sections.get(tname, []) if not ln.startswith("-N ")]
        lines.append("COMMIT")
        out += lines
    return "".join(line + "\n" for line in out)


def cleanup_payload(current, target=None, recorded=None):
    """One restore input removing meshbpf's part of `current`; '' if there is none."""
    have = ours(current, target, recorded)
    out = []
    for tname in sorted(have):
        h = have[tname]
        out.append(f"*{tname}")
        out += [f"-D {c} {s}" for c, s in h["builtin"]]
        out += [f"-F {c}" for c in h["chains"]]
        out += [f"-X {c}" for c in h["chains"]]
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def rollback_payload(before, tables):
    """Restore input (for a run WITHOUT --noflush) putting `tables` back as in dump `before`.

    Tables absent from `before` are emptied. Returns '' when `tables` is empty.
    """
    sections = {}
    cur = None
    for raw in before.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("*"):
            cur = s[1:].strip()
            sections[cur] = [s]
        elif cur is not None:
            sections[cur].append(s)
            if s == "COMMIT":
                cur = None
    out = []
    for tname in sorted(tables):
        out += sections.get(tname, [f"*{tname}", "COMMIT"])
    return "".join(line + "\n" for line in out)


def builtin_rules(target):
    """{table: [(chain, spec)]} of the target's built-in-chain rules, for the state record."""
    return {t: [list(p) for p in w["builtin"]] for t, w in wanted(target).items() if w["builtin"]}


def recorded_from_json(data):
    """Inverse of builtin_rules after a JSON round trip."""
    return {t: [tuple(p) for p in pairs] for t, pairs in (data or {}).items()}
