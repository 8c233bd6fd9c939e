#!/usr/bin/env python3
"""Writes the hand-written seeds of the text targets into fuzz/seeds/TARGET/: policies and
configs from the docs and the tests, SPIFFE IDs, request heads, Forwarded values and paths from
the attacks of issue 18. Run from anywhere; it adds or rewrites files, never removes one."""
import hashlib, pathlib, re

repo = pathlib.Path(__file__).resolve().parents[2]
seeds = repo / "fuzz" / "seeds"


def write(target, name, data):
    d = seeds / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


# Policies: every raw string of the tests that is a policy file, and one with every field.
seen = set()
for rs in sorted(list((repo / "tests").rglob("*.rs")) + list((repo / "agent").rglob("*.rs"))):
    for m in re.finditer(r'r#"(.*?)"#', rs.read_text(), re.S):
        text = m.group(1)
        if "apiVersion: security.istio.io" not in text or "{" in text and "{}" not in text and "{ " not in text:
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        if digest in seen:
            continue
        seen.add(digest)
        write("policy", f"{rs.stem}-{digest}.yaml", text)

write("policy", "every-field.yaml", """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: every-field
  namespace: prod
  labels: { team: a }
spec:
  selector:
    matchLabels: { app: payment-service, version: v1 }
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/prod/sa/frontend", "*/sa/admin", "prefix*"]
        notPrincipals: ["cluster.local/ns/test/*"]
        namespaces: ["prod", "st*"]
        notNamespaces: ["kube-system"]
        ipBlocks: ["10.244.0.0/16", "fd00::/8", "10.1.2.3"]
        notIpBlocks: ["10.244.9.0/24"]
        remoteIpBlocks: ["10.0.0.0/8"]
    to:
    - operation:
        ports: ["8080", 9090]
        notPorts: ["15000"]
        methods: ["GET", "POST"]
        notMethods: ["DELETE"]
        paths: ["/api/*", "*/info", "/exact"]
        notPaths: ["/api/admin*"]
        hosts: ["payment", "*.example.com"]
        notHosts: ["internal.example"]
    when:
    - key: source.ip
      values: ["10.244.1.2"]
    - key: destination.port
      notValues: ["22"]
    - key: source.principal
      values: ["cluster.local/ns/prod/sa/frontend"]
    - key: request.headers[x-user]
      values: ["alice"]
  - {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: { name: deny-all, namespace: istio-system }
spec:
  action: DENY
  rules: [{ to: [{ operation: { paths: ["/admin", "/admin/*"] } }] }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: audit, namespace: prod }
spec: { action: AUDIT, rules: [{ from: [{ source: { namespaces: ["test"] } }] }] }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: default, namespace: istio-system }
spec: { mtls: { mode: STRICT } }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: payment, namespace: prod }
spec:
  selector: { matchLabels: { app: payment-service } }
  mtls: { mode: UNSET }
  portLevelMtls:
    8080: { mode: PERMISSIVE }
    "9090": { mode: DISABLE }
""")
write("policy", "allow-nothing.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n  namespace: prod\nspec: {}\n")
write("policy", "errors.yaml", "apiVersion: v1\nkind: ConfigMap\n---\nkind: AuthorizationPolicy\n---\n- a\n- b\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: '' }\nspec: { action: MAYBE, rules: [{ to: [{ operation: { ports: [0, 70000, x] } }] }] }\n--- # c\n{ [ unclosed\n")

# Config: the documented example, and a minimal one.
doc = (repo / "docs" / "config.md").read_text()
for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc, re.S)):
    write("config", f"docs-config-{i}.yaml", block)
write("config", "minimal.yaml", "node: { name: n, address: 10.244.0.1 }\ntrustDomain: td\ncgroupRoot: /sys/fs/cgroup\nbpfPinDir: /sys/fs/bpf/latch\n")
write("config", "files.yaml", """node:
  name: node-b
  address: fd00::2
trustDomain: example.org
cgroupRoot: /sys/fs/cgroup/k
bpfPinDir: /sys/fs/bpf/x
ports: { capture: 1, inbound: 2, tunnel: 65535 }
dataplane: { mode: tunnel, verdictTtl: 24h, workerThreads: 256, busyPoll: 0s }
mtls: { mode: STRICT, strictFastpath: true }
tunnel: { handshakeTimeout: 1m, maxHandshakesPerSource: 4096 }
http: { pathNormalization: DECODE_AND_MERGE_SLASHES, headerReadTimeout: 1s }
certificates: { source: files, dir: /etc/latch/svids, ttl: 10m }
metrics: off
workloads:
  - name: a.b
    namespace: x-1
    serviceAccount: s
    cgroup: /sys/fs/cgroup/k/a
    netns: /run/netns/a
    ips: [10.244.1.2, "fd00::1:2"]
peers:
  - { name: p, namespace: x-1, serviceAccount: s, ips: [10.244.2.2], node: 10.244.0.2 }
""")

# SPIFFE IDs: the specification's examples, valid and not.
for i, s in enumerate([
    "spiffe://cluster.local/ns/prod/sa/frontend", "spiffe://trustdomain", "spiffe://td/a_b.c-d/E",
    "spiffe://td/.../x", "spiffe://td/./x", "spiffe://td//x", "spiffe://td/x/", "spiffe://TD/x",
    "spiffe://user@td:80/x?q#f", "spiffe://td/%41", "spiffe://td/ns/a/sa/b/c", "spiffe:///x",
]):
    write("spiffe_id", f"{i:02}", s)

# Request heads: the first byte picks the path normalisation (0 NONE, 1 BASE, 2 MERGE_SLASHES,
# 3 DECODE_AND_MERGE_SLASHES).
heads = [
    "GET /x/../admin HTTP/1.1\r\nHost: payment:8080\r\n\r\n",
    "GET /./admin HTTP/1.1\r\nHost: payment\r\n\r\n",
    "GET /%61dmin?x=/../y HTTP/1.1\r\nHost: payment\r\n\r\n",
    "GET //a/./b?q HTTP/1.1\r\nHost: payment\r\n\r\n",
    "GET http://internal.example:8080/a/../b?q HTTP/1.1\r\nHost: payment\r\n\r\n",
    "GET http://user@internal.example/ok HTTP/1.1\r\nHost: payment\r\n\r\n",
    "GET /ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "GET /ok HTTP/1.1\r\n\r\n",
    "GET /a/../b HTTP/1.0\r\n\r\n",
    "OPTIONS * HTTP/1.1\r\nHost: payment\r\n\r\n",
    "CONNECT 10.244.2.2:8080 HTTP/1.1\r\nHost: 10.244.2.2:8080\r\n\r\n",
    "POST /x%2F..%2Fadmin HTTP/1.1\r\nHost: [fd00::1]:80\r\nContent-Length: 0\r\n\r\n",
    "GET /a\\..\\admin HTTP/1.1\r\nHost: payment\r\n\r\n",
    "GET /%zz HTTP/1.1\r\nHost: payment\r\n\r\n",
]
for i, h in enumerate(heads):
    write("request_head", f"{i:02}", bytes([i % 4]) + h.encode())

for i, f in enumerate([
    'for="10.244.1.2:41000"', 'for="[fd00:244::1:2]:41000"', "For=10.244.1.2", "proto=https; for=10.244.1.2;by=x",
    "for=10.244.1.2:80, for=10.244.9.9", 'for="[fd00::2]"', "for=_hidden", "for=unknown", 'for="[fd00::2"',
    "by=10.244.1.2", "10.244.2.2:8080", "[fe80::1%2]:80",
]):
    write("forwarded", f"{i:02}", f)

for i, p in enumerate([
    "/x/../admin", "/./admin", "/%61dmin", "/a/%2e%2E/admin", "/a/.%2e", "/a/b/c/./../../g", "//admin",
    "/a//../b", "/x/..%2Fadmin", "/x%2F%2F..%2Fadmin", "/a\\..\\admin", "/%7euser/%41%5a", "/%2561dmin",
    "/caf\u00e9", "/{\"a\"}|^", "", "../admin", "/%zz", "/a%00b", "/%", "/a%5Cb/%2f",
]):
    write("normalize_path", f"{i:02}", p)
