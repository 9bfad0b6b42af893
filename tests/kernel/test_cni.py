"""meshbpf-cni as a container runtime runs it: Debian's reference plugins (bridge +
host-local, /usr/lib/cni) and meshbpf-cni chained in one conflist, each invoked exactly as
libcni invokes a chain (CNI_* environment, the plugin's config on stdin with the list's
name and cniVersion and the previous plugin's result as prevResult; DEL in reverse with the
cached result), from inside the test bed's node netns (the bridge is made there, never in
the machine's network), for pod netns the test made, with the node agent running (a pods
file with a pending "shop/web-0" entry) and a real Envoy sidecar run as uid 1337.

- The app's first connection, made the moment ADD returns, goes through Envoy to the right
  original destination: the ADD itself enrolled the pod (nothing else tells the agent).
- CHECK passes; an agent restart keeps the pod enrolled (the binding and the record).
- DEL leaves nothing: no record, no map entry, no binding, no pins beyond the node's, no
  veth or address lease left by bridge's DEL.
- Agent down: ADD fails with the spec's error (code 11) and the runtime's DEL succeeds;
  with fail_open ADD succeeds and passes bridge's result through unchanged.
"""

import json
import os
import uuid

import pytest

from meshbpf import system
from meshbpf.testbed import traffic

from .cnirt import (
    OUT_CX,
    Agent,
    CniFailed,
    cni_args,
    cni_node,
    links_on_bridge,
    map_entry,
    new_pod,
    pins,
)

pytestmark = pytest.mark.kernel


@pytest.fixture
def node():
    with cni_node("cni", {"pods": [{"name": "shop/web-0"}]}) as n:
        yield n


def test_first_connection_after_add_goes_through_envoy_and_del_leaves_nothing(node):
    sb, rt, conflist, pods_file, sock, ipam_dir, agents = node
    agent = Agent(sb, pods_file, sock)
    agents.append(agent)
    assert agent.pods()["shop/web-0"]["state"] == "pending"

    # the server: a pod that is not meshed (its ADD is answered "not meshed")
    db_uid, db_cid = str(uuid.uuid4()), uuid.uuid4().hex
    db = new_pod(sb, "db", 2, db_uid)
    rt.loopback(db_cid, db.netns)
    db_res = rt.add(conflist, db_cid, db.netns, cni_args("shop", "db-0", db_uid, db_cid))
    assert db_res[1] == db_res[0]                    # passed through unchanged
    db.ip4 = db_res[-1]["ips"][0]["address"].split("/")[0]
    db.start_http_server(8080)

    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex
    web = new_pod(sb, "web", 1, uid)
    rt.loopback(cid, web.netns)
    web.ip4 = "0.0.0.0"
    env = web.start_envoy()                          # the sidecar, as uid 1337, in the pod
    pins_before = pins(sb)
    args = cni_args("shop", "web-0", uid, cid)

    results = rt.add(conflist, cid, web.netns, args)
    # ---- ADD has returned: nothing else has told the agent about this pod ----
    first = traffic.http_get(web, db.ip4, 8080)
    took = [t for kind, cmd, rc, t in rt.calls if kind == "meshbpf-cni" and cmd == "ADD"][-1]
    print(f"meshbpf-cni ADD (process start to exit, attach included): {took * 1000:.0f} ms")
    assert took < 5, took          # a plugin that waited out a timeout would show here
    assert results[1] == results[0]                  # bridge's result, unchanged
    assert first["status"].endswith("200 OK") and first["reply"]["pod"] == "db"
    assert first["reply"]["local"][1] == 8080 and first["reply"]["local"][0].endswith(db.ip4)
    assert env.stats().get(OUT_CX, 0) == 1, "the first connection did not go through Envoy"
    assert first["peer"][0].endswith(db.ip4)         # the app sees the peer it dialled

    rec_path = os.path.join(sb.state_dir, "pods", "shop:web-0.json")
    rec = json.load(open(rec_path))
    cookie = system.netns_cookie(web.netns)
    assert rec["netns"] == web.netns and rec["netns_cookie"] == cookie and rec["mode"] == "ebpf"
    assert rec["cgroup"] == os.path.realpath(web.cgroup)          # found by the pod's UID
    assert map_entry(sb, cookie) is not None
    assert agent.pods()["shop/web-0"]["state"] == "attached"
    assert not os.path.exists(os.path.join(sb.state_dir, "pods", "shop:db-0.json"))
    rt.check(conflist, cid, web.netns, args, results[-1])

    # a restarted agent keeps it: the binding and the record survive, no re-attach
    agent.kill()
    agent = Agent(sb, pods_file, sock)
    agents.append(agent)
    assert agent.pods()["shop/web-0"]["state"] == "attached"
    assert json.load(open(rec_path))["updated"] == rec["updated"]
    assert traffic.http_get(web, db.ip4, 8080)["reply"]["pod"] == "db"
    assert env.stats().get(OUT_CX, 0) == 2

    host_end = links_on_bridge(sb)
    assert len(host_end) == 2
    rt.delete(conflist, cid, web.netns, args, results[-1])
    assert not os.path.exists(rec_path)
    assert map_entry(sb, cookie) is None
    assert not os.path.exists(os.path.join(sb.state_dir, "by-cookie", str(cookie)))
    bindings = json.load(open(os.path.join(sb.state_dir, "cni.json")))["bindings"]
    assert "shop/web-0" not in bindings
    assert pins(sb) == pins_before
    assert agent.pods()["shop/web-0"]["state"] == "pending"
    leases = [n for n in os.listdir(os.path.join(ipam_dir, "mbt-pods")) if n[0].isdigit()]
    assert leases == [db.ip4]                        # web's address released
    assert len(links_on_bridge(sb)) == 1             # only db's veth stays on the bridge
    links = system.run(["ip", "-n", web.netns_name, "-o", "link", "show"]).stdout
    assert [l.split(":")[1].strip() for l in links.splitlines()] == ["lo"]     # eth0 gone
    assert traffic.connect(web, db.ip4, 8080, http="/", allow_error="connect")["error"]
    rt.delete(conflist, cid, web.netns, args, results[-1])           # a second DEL: fine
    rt.delete(conflist, db_cid, db.netns, cni_args("shop", "db-0", db_uid, db_cid), db_res[-1])
    assert json.load(open(os.path.join(sb.state_dir, "cni.json")))["bindings"] == {}
    assert os.listdir(os.path.join(sb.state_dir, "pods")) == []


def test_agent_down_add_fails_del_succeeds_fail_open_passes_through(node):
    sb, rt, conflist, pods_file, sock, ipam_dir, agents = node
    assert not os.path.exists(sock)                  # no agent
    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex
    web = new_pod(sb, "web", 1, uid)
    args = cni_args("shop", "web-0", uid, cid)
    with pytest.raises(CniFailed) as e:
        rt.add(conflist, cid, web.netns, args)
    assert e.value.plugin == "meshbpf-cni" and e.value.rc != 0
    assert e.value.out["code"] == 11 and e.value.out["cniVersion"] == "1.0.0"
    assert "not reachable" in e.value.out["msg"] and sock in e.value.out["details"]
    # the runtime tears the half-made network down: DEL succeeds without the agent
    rt.delete(conflist, cid, web.netns, args, None)
    assert links_on_bridge(sb) == []

    open_list = json.loads(json.dumps(conflist))
    open_list["plugins"][-1]["fail_open"] = True
    cid2 = uuid.uuid4().hex
    results = rt.add(open_list, cid2, web.netns, args)
    assert results[1] == results[0] and results[0]["ips"][0]["address"].startswith("10.234.7.")
    rt.delete(open_list, cid2, web.netns, args, results[-1])
    assert links_on_bridge(sb) == []
    assert not os.path.exists(os.path.join(sb.state_dir, "pods"))
