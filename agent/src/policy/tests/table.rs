//! Istio's documented semantics, one compact row each: policies (see [`super::expand`]), a
//! request (see [`super::Req`]) and the expected outcome:
//! `allow|deny|needs` then optional `cache|nocache`, `by=ns/name|none`, `rule=N`,
//! `tcp=allow|deny` (also [`PolicySet::evaluate_tcp`]), `audit=ns/name`, `mtls=MODE`,
//! `msrc=ns/name|default`, `dry=allow|deny|http|none` (the dry-run shadow decision).

use super::{Req, set};
use crate::policy::{ConnectionDecision, PolicySet, Target};

const ALLOW_FE: &str = "AP prod/allow-fe\naction: ALLOW\nrules: [{from: [{source: {principals: [cluster.local/ns/prod/sa/frontend]}}]}]";

#[rustfmt::skip]
const CASES: &[(&str, &str, &str, &str)] = &[
    // (name, policies, request, expected)
    ("no policies allows", "", "", "allow cache by=none"),
    ("no policies allows plaintext, not cacheable", "", "from=plain", "allow nocache"),
    ("principal exact match", ALLOW_FE, "", "allow cache by=prod/allow-fe rule=0"),
    ("principal mismatch denies", ALLOW_FE, "from=prod/other", "deny cache by=none"),
    ("principal: plaintext does not match", ALLOW_FE, "from=plain", "deny nocache"),
    ("principal: spiffe:// stripped", ALLOW_FE, "id=spiffe://cluster.local/ns/prod/sa/frontend", "allow"),
    ("principal prefix", "AP prod/p\nrules: [{from: [{source: {principals: [cluster.local/ns/prod/*]}}]}]", "from=prod/x", "allow"),
    ("principal prefix miss", "AP prod/p\nrules: [{from: [{source: {principals: [cluster.local/ns/prod/*]}}]}]", "from=dev/x", "deny"),
    ("principal suffix", "AP prod/p\nrules: [{from: [{source: {principals: ['*/sa/frontend']}}]}]", "from=dev/frontend", "allow"),
    ("principal suffix miss", "AP prod/p\nrules: [{from: [{source: {principals: ['*/sa/frontend']}}]}]", "from=dev/backend", "deny"),
    ("principal * matches any mTLS", "AP prod/p\nrules: [{from: [{source: {principals: ['*']}}]}]", "from=x/y", "allow"),
    ("principal * does not match plaintext", "AP prod/p\nrules: [{from: [{source: {principals: ['*']}}]}]", "from=plain", "deny"),
    ("principals are OR-ed", "AP prod/p\nrules: [{from: [{source: {principals: [cluster.local/ns/a/sa/a, cluster.local/ns/prod/sa/frontend]}}]}]", "", "allow"),
    ("notPrincipals excludes", "AP prod/p\nrules: [{from: [{source: {notPrincipals: [cluster.local/ns/prod/sa/frontend]}}]}]", "", "deny"),
    ("notPrincipals admits others", "AP prod/p\nrules: [{from: [{source: {notPrincipals: [cluster.local/ns/prod/sa/frontend]}}]}]", "from=prod/b", "allow"),
    ("notPrincipals matches plaintext", "AP prod/p\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]", "from=plain", "allow nocache"),
    ("notPrincipals * excludes mTLS", "AP prod/p\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]", "", "deny"),
    ("namespace match", "AP prod/p\nrules: [{from: [{source: {namespaces: [dev]}}]}]", "from=dev/x", "allow"),
    ("namespace miss", "AP prod/p\nrules: [{from: [{source: {namespaces: [dev]}}]}]", "from=prod/x", "deny"),
    ("namespace prefix", "AP prod/p\nrules: [{from: [{source: {namespaces: [de*]}}]}]", "from=dev/x", "allow"),
    ("namespace suffix", "AP prod/p\nrules: [{from: [{source: {namespaces: ['*ev']}}]}]", "from=dev/x", "allow"),
    ("namespace * not plaintext", "AP prod/p\nrules: [{from: [{source: {namespaces: ['*']}}]}]", "from=plain", "deny"),
    ("notNamespaces excludes", "AP prod/p\nrules: [{from: [{source: {notNamespaces: [dev]}}]}]", "from=dev/x", "deny"),
    ("notNamespaces matches plaintext", "AP prod/p\nrules: [{from: [{source: {notNamespaces: [dev]}}]}]", "from=plain", "allow"),
    ("fields in one source are AND-ed", "AP prod/p\nrules: [{from: [{source: {namespaces: [prod], notPrincipals: [cluster.local/ns/prod/sa/frontend]}}]}]", "", "deny"),
    ("from entries are OR-ed", "AP prod/p\nrules: [{from: [{source: {namespaces: [dev]}}, {source: {namespaces: [prod]}}]}]", "", "allow"),
    ("ipBlocks CIDR v4", "AP prod/p\nrules: [{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]", "sip=10.1.9.9", "allow nocache"),
    ("ipBlocks CIDR miss", "AP prod/p\nrules: [{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]", "sip=10.2.0.1", "deny nocache"),
    ("ipBlocks single IP", "AP prod/p\nrules: [{from: [{source: {ipBlocks: [10.1.2.3]}}]}]", "sip=10.1.2.3", "allow"),
    ("ipBlocks single IP miss", "AP prod/p\nrules: [{from: [{source: {ipBlocks: [10.1.2.3]}}]}]", "sip=10.1.2.4", "deny"),
    ("ipBlocks v6", "AP prod/p\nrules: [{from: [{source: {ipBlocks: ['fd00::/8']}}]}]", "sip=fd12::1", "allow"),
    ("ipBlocks v6 vs v4 source", "AP prod/p\nrules: [{from: [{source: {ipBlocks: ['fd00::/8']}}]}]", "sip=10.0.0.1", "deny"),
    ("ipBlocks v4-mapped source", "AP prod/p\nrules: [{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]", "sip=::ffff:10.1.0.7", "allow"),
    ("notIpBlocks excludes", "AP prod/p\nrules: [{from: [{source: {notIpBlocks: [10.1.0.0/16]}}]}]", "sip=10.1.0.7", "deny"),
    ("notIpBlocks admits", "AP prod/p\nrules: [{from: [{source: {notIpBlocks: [10.1.0.0/16]}}]}]", "sip=10.3.0.7", "allow nocache"),
    ("ports as numbers", "AP prod/p\nrules: [{to: [{operation: {ports: [80, 443]}}]}]", "port=443", "allow cache"),
    ("ports as strings", "AP prod/p\nrules: [{to: [{operation: {ports: ['8080']}}]}]", "port=8080", "allow"),
    ("port miss", "AP prod/p\nrules: [{to: [{operation: {ports: ['8080']}}]}]", "port=80", "deny"),
    ("notPorts", "AP prod/p\nrules: [{to: [{operation: {notPorts: [80]}}]}]", "port=80", "deny"),
    ("notPorts admits", "AP prod/p\nrules: [{to: [{operation: {notPorts: [80]}}]}]", "port=81", "allow"),
    ("rule needs from AND to", "AP prod/p\nrules: [{from: [{source: {namespaces: [prod]}}], to: [{operation: {ports: [81]}}]}]", "port=80", "deny"),
    ("rules are OR-ed", "AP prod/p\nrules: [{to: [{operation: {ports: [81]}}]}, {from: [{source: {namespaces: [prod]}}]}]", "port=80", "allow rule=1"),
    ("when source.namespace", "AP prod/p\nrules: [{when: [{key: source.namespace, values: [prod]}]}]", "", "allow cache"),
    ("when source.namespace notValues", "AP prod/p\nrules: [{when: [{key: source.namespace, notValues: [prod]}]}]", "", "deny"),
    ("when source.principal", "AP prod/p\nrules: [{when: [{key: source.principal, values: ['*/sa/frontend']}]}]", "", "allow"),
    ("when source.principal plaintext", "AP prod/p\nrules: [{when: [{key: source.principal, values: ['*']}]}]", "from=plain", "deny"),
    ("when source.ip", "AP prod/p\nrules: [{when: [{key: source.ip, values: [10.1.0.0/16]}]}]", "", "allow nocache"),
    ("when source.ip miss", "AP prod/p\nrules: [{when: [{key: source.ip, notValues: [10.1.0.0/16]}]}]", "", "deny nocache"),
    ("when destination.ip", "AP prod/p\nrules: [{when: [{key: destination.ip, values: [10.9.0.1]}]}]", "", "allow nocache"),
    ("when destination.ip miss", "AP prod/p\nrules: [{when: [{key: destination.ip, values: [10.9.0.2]}]}]", "", "deny"),
    ("when destination.port", "AP prod/p\nrules: [{when: [{key: destination.port, values: ['80']}]}]", "", "allow cache"),
    ("when destination.port number miss", "AP prod/p\nrules: [{when: [{key: destination.port, values: [81]}]}]", "", "deny"),
    ("when conditions AND-ed", "AP prod/p\nrules: [{when: [{key: destination.port, values: [80]}, {key: source.namespace, values: [dev]}]}]", "", "deny"),
    ("when values and notValues", "AP prod/p\nrules: [{when: [{key: source.namespace, values: ['*'], notValues: [dev]}]}]", "", "allow"),
    ("DENY wins over ALLOW", "AP prod/a\nrules: [{}]\nAP prod/d\naction: DENY\nrules: [{from: [{source: {namespaces: [prod]}}]}]", "", "deny cache by=prod/d rule=0"),
    ("DENY not matching leaves ALLOW", "AP prod/a\nrules: [{}]\nAP prod/d\naction: DENY\nrules: [{from: [{source: {namespaces: [dev]}}]}]", "", "allow by=prod/a"),
    ("DENY only: others allowed", "AP prod/d\naction: DENY\nrules: [{from: [{source: {namespaces: [dev]}}]}]", "", "allow by=none"),
    ("DENY with no rules matches nothing", "AP prod/d\naction: DENY", "", "allow"),
    ("ALLOW spec {} denies all", "AP prod/a", "", "deny cache by=none"),
    ("ALLOW spec {} denies plaintext", "AP prod/a", "from=plain", "deny nocache"),
    ("ALLOW rules: [{}] allows all", "AP prod/a\nrules: [{}]", "from=plain", "allow by=prod/a rule=0"),
    ("ALLOW and empty ALLOW: match wins", "AP prod/a\nAP prod/b\nrules: [{}]", "", "allow by=prod/b"),
    ("selector applies", "AP prod/a\nselector: {matchLabels: {app: pay}}", "l:app=pay", "deny"),
    ("selector does not apply", "AP prod/a\nselector: {matchLabels: {app: pay}}", "l:app=web", "allow"),
    ("selector needs all labels", "AP prod/a\nselector: {matchLabels: {app: pay, tier: db}}", "l:app=pay", "allow"),
    ("selector all labels present", "AP prod/a\nselector: {matchLabels: {app: pay, tier: db}}", "l:app=pay l:tier=db l:x=y", "deny"),
    ("other namespace does not apply", "AP dev/a", "", "allow"),
    ("root namespace applies everywhere", "AP istio-system/a", "ns=anything", "deny"),
    ("root namespace selector", "AP istio-system/a\nselector: {matchLabels: {app: pay}}", "ns=x l:app=pay", "deny"),
    ("root namespace selector miss", "AP istio-system/a\nselector: {matchLabels: {app: pay}}", "ns=x l:app=web", "allow"),
    ("root DENY over namespace ALLOW", "AP istio-system/d\naction: DENY\nrules: [{to: [{operation: {ports: [80]}}]}]\nAP prod/a\nrules: [{}]", "", "deny by=istio-system/d"),
    ("AUDIT reported, no effect", "AP prod/au\naction: AUDIT\nrules: [{}]", "", "allow audit=prod/au"),
    ("AUDIT does not make ALLOW apply", "AP prod/au\naction: AUDIT\nrules: [{from: [{source: {namespaces: [dev]}}]}]", "", "allow"),
    ("AUDIT with DENY", "AP prod/au\naction: AUDIT\nrules: [{}]\nAP prod/d\naction: DENY\nrules: [{}]", "", "deny audit=prod/au by=prod/d"),
    // serviceAccounts (`ns/sa`, or `sa` in the policy's namespace)
    ("serviceAccounts ns/sa", "AP prod/p\nrules: [{from: [{source: {serviceAccounts: [prod/frontend]}}]}]", "", "allow cache"),
    ("serviceAccounts short form", "AP prod/p\nrules: [{from: [{source: {serviceAccounts: [frontend]}}]}]", "", "allow"),
    ("serviceAccounts short form is the policy's namespace", "AP prod/p\nrules: [{from: [{source: {serviceAccounts: [frontend]}}]}]", "from=dev/frontend", "deny"),
    ("serviceAccounts short form of a root policy", "AP istio-system/p\nrules: [{from: [{source: {serviceAccounts: [frontend]}}]}]", "", "deny"),
    ("serviceAccounts other account", "AP prod/p\nrules: [{from: [{source: {serviceAccounts: [prod/frontend]}}]}]", "from=prod/backend", "deny"),
    ("serviceAccounts not plaintext", "AP prod/p\nrules: [{from: [{source: {serviceAccounts: [prod/frontend]}}]}]", "from=plain", "deny nocache"),
    ("notServiceAccounts excludes", "AP prod/p\nrules: [{from: [{source: {notServiceAccounts: [prod/frontend]}}]}]", "", "deny"),
    ("notServiceAccounts admits others", "AP prod/p\nrules: [{from: [{source: {notServiceAccounts: [frontend]}}]}]", "from=prod/backend", "allow cache"),
    // request.headers
    ("header condition: connection needs HTTP", "AP prod/a\nrules: [{when: [{key: 'request.headers[x-env]', values: [prod]}]}]", "", "needs tcp=deny"),
    ("header condition matches", "AP prod/a\nrules: [{when: [{key: 'request.headers[x-env]', values: [prod]}]}]", "hdr:x-env=prod", "allow nocache rule=0"),
    ("header condition: other value", "AP prod/a\nrules: [{when: [{key: 'request.headers[x-env]', values: [prod]}]}]", "hdr:x-env=dev", "deny"),
    ("header condition: name case-insensitive", "AP prod/a\nrules: [{when: [{key: 'request.headers[X-Env]', values: [pr*]}]}]", "hdr:x-env=prod", "allow"),
    ("header condition: absent header is no match", "AP prod/a\nrules: [{when: [{key: 'request.headers[x-env]', values: ['*']}]}]", "m=GET", "deny"),
    ("header notValues: absent header passes", "AP prod/a\nrules: [{when: [{key: 'request.headers[x-env]', notValues: [dev]}]}]", "m=GET", "allow"),
    ("header fields joined with commas", "AP prod/a\nrules: [{when: [{key: 'request.headers[x-a]', values: ['1,2']}]}]", "hdr:x-a=1 hdr:x-a=2", "allow"),
    ("DENY on a header: TCP denied by it", "AP prod/d\naction: DENY\nrules: [{when: [{key: 'request.headers[x-debug]', values: ['*']}]}]", "", "needs tcp=deny"),
    ("DENY on a header: request without it", "AP prod/d\naction: DENY\nrules: [{when: [{key: 'request.headers[x-debug]', values: ['*']}]}]", "m=GET", "allow"),
    // requestPrincipals and request.auth.*
    ("requestPrincipals: connection needs HTTP", "AP prod/a\nrules: [{from: [{source: {requestPrincipals: ['https://issuer/*']}}]}]", "", "needs tcp=deny"),
    ("requestPrincipals match", "AP prod/a\nrules: [{from: [{source: {requestPrincipals: ['https://issuer/*']}}]}]", "jwt=https://issuer/alice", "allow nocache"),
    ("requestPrincipals: no token", "AP prod/a\nrules: [{from: [{source: {requestPrincipals: ['*']}}]}]", "m=GET", "deny"),
    ("requestPrincipals: other issuer", "AP prod/a\nrules: [{from: [{source: {requestPrincipals: ['https://issuer/*']}}]}]", "jwt=https://other/alice", "deny"),
    ("requestPrincipals AND principals", "AP prod/a\nrules: [{from: [{source: {principals: [cluster.local/ns/prod/sa/frontend], requestPrincipals: ['*']}}]}]", "from=prod/other jwt=i/s", "deny"),
    ("DENY notRequestPrincipals *: no token denied", "AP prod/d\naction: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]", "m=GET", "deny by=prod/d"),
    ("DENY notRequestPrincipals *: token passes", "AP prod/d\naction: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]", "jwt=i/s", "allow"),
    ("request.auth.principal", "AP prod/a\nrules: [{when: [{key: request.auth.principal, values: [i/alice]}]}]", "jwt=i/alice", "allow"),
    ("request.auth.audiences: any", "AP prod/a\nrules: [{when: [{key: request.auth.audiences, values: [pay]}]}]", "jwt=i/s aud=web aud=pay", "allow"),
    ("request.auth.audiences: none match", "AP prod/a\nrules: [{when: [{key: request.auth.audiences, values: [pay]}]}]", "jwt=i/s aud=web", "deny"),
    ("request.auth.presenter", "AP prod/a\nrules: [{when: [{key: request.auth.presenter, values: [web]}]}]", "jwt=i/s azp=web", "allow"),
    ("claim in a list claim", "AP prod/a\nrules: [{when: [{key: 'request.auth.claims[scope]', values: ['payments:write']}]}]", "jwt=i/s claim:scope=payments:read,payments:write", "allow"),
    ("claim missing the value", "AP prod/a\nrules: [{when: [{key: 'request.auth.claims[scope]', values: ['payments:write']}]}]", "jwt=i/s claim:scope=payments:read", "deny"),
    ("claim: a string is not split on spaces", "AP prod/a\nrules: [{when: [{key: 'request.auth.claims[scope]', values: [b]}]}]", "jwt=i/s claim:scope=a%20b", "deny"),
    ("nested claim", "AP prod/a\nrules: [{when: [{key: 'request.auth.claims[realm][role]', values: [admin]}]}]", "jwt=i/s claim:realm.role=admin", "allow"),
    ("nested claim: other value", "AP prod/a\nrules: [{when: [{key: 'request.auth.claims[realm][role]', values: [admin]}]}]", "jwt=i/s claim:realm.role=user", "deny"),
    ("claim without a token", "AP prod/a\nrules: [{when: [{key: 'request.auth.claims[scope]', values: ['*']}]}]", "m=GET", "deny"),
    // istio.io/dry-run: evaluated and recorded, never enforced
    ("no dry-run policy: no shadow", ALLOW_FE, "", "allow dry=none"),
    ("dry-run DENY is not enforced", "APD prod/d\naction: DENY\nrules: [{}]", "", "allow cache by=none dry=deny"),
    ("dry-run ALLOW is not enforced", "APD prod/a\nrules: [{from: [{source: {namespaces: [dev]}}]}]", "", "allow by=none dry=deny"),
    ("dry-run ALLOW that would allow", "APD prod/a\nrules: [{from: [{source: {namespaces: [prod]}}]}]", "", "allow dry=allow"),
    ("dry-run beside an enforced DENY", "AP prod/d\naction: DENY\nrules: [{}]\nAPD prod/a\nrules: [{}]", "", "deny by=prod/d dry=deny"),
    ("dry-run L7: no HTTP parsing forced", "APD prod/d\naction: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]", "", "allow cache dry=http"),
    ("dry-run L7 on a request", "APD prod/d\naction: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]", "m=POST", "allow dry=deny"),
    // targetRef(s): for gateways and waypoints, never applied to workloads
    ("targetRefs policy not applied", "AP prod/g\ntargetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]", "", "allow by=none"),
    ("targetRef DENY not applied", "AP prod/g\naction: DENY\ntargetRef: {kind: Service, group: '', name: pay}\nrules: [{}]", "", "allow by=none"),
    // L7
    ("ALLOW methods: connection needs HTTP", "AP prod/a\nrules: [{to: [{operation: {methods: [GET]}}]}]", "", "needs tcp=deny"),
    ("ALLOW methods: GET allowed", "AP prod/a\nrules: [{to: [{operation: {methods: [GET]}}]}]", "m=GET", "allow nocache"),
    ("ALLOW methods: POST denied", "AP prod/a\nrules: [{to: [{operation: {methods: [GET]}}]}]", "m=POST", "deny nocache"),
    ("ALLOW paths prefix", "AP prod/a\nrules: [{to: [{operation: {paths: [/api/*]}}]}]", "p=/api/v1?x=1", "allow"),
    ("ALLOW paths exact ignores query", "AP prod/a\nrules: [{to: [{operation: {paths: [/health]}}]}]", "p=/health?full=1", "allow"),
    ("ALLOW paths suffix miss", "AP prod/a\nrules: [{to: [{operation: {paths: ['*.png']}}]}]", "p=/a.jpg", "deny"),
    ("notPaths", "AP prod/a\nrules: [{to: [{operation: {notPaths: [/admin*]}}]}]", "p=/admin/x", "deny"),
    ("notMethods", "AP prod/a\nrules: [{to: [{operation: {notMethods: [DELETE]}}]}]", "m=GET", "allow"),
    ("hosts case-insensitive", "AP prod/a\nrules: [{to: [{operation: {hosts: [Pay.Example.COM]}}]}]", "h=pay.example.com", "allow"),
    ("hosts suffix", "AP prod/a\nrules: [{to: [{operation: {hosts: ['*.example.com']}}]}]", "h=A.EXAMPLE.COM", "allow"),
    ("notHosts", "AP prod/a\nrules: [{to: [{operation: {notHosts: ['*.internal']}}]}]", "h=x.internal", "deny"),
    ("L7 rule unreachable by port: decided", "AP prod/a\nrules: [{to: [{operation: {ports: [81], methods: [GET]}}]}]", "", "deny"),
    ("L7 rule of another port: this port stays cacheable", "AP prod/a\nrules: [{to: [{operation: {ports: [8000], methods: [POST]}}]}, {to: [{operation: {ports: [80]}}]}]", "port=80", "allow cache rule=1"),
    ("L7 rule of this port: not cacheable", "AP prod/a\nrules: [{to: [{operation: {ports: [8000], methods: [POST]}}]}, {to: [{operation: {ports: [80]}}]}]", "port=8000 m=POST", "allow nocache rule=0"),
    ("ipBlocks rule of another port: this port stays cacheable", "AP prod/a\nrules: [{from: [{source: {ipBlocks: [10.1.0.0/16]}}], to: [{operation: {ports: [9000]}}]}, {to: [{operation: {ports: [80]}}]}]", "port=80", "allow cache rule=1"),
    ("ALLOW L4 rule matches: decided", "AP prod/a\nrules: [{to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: [80]}}]}]", "", "allow nocache tcp=allow"),
    ("ALLOW L7 OR L4 in one rule: TCP drops rule", "AP prod/a\nrules: [{to: [{operation: {methods: [GET]}}, {operation: {ports: [80]}}]}]", "", "needs tcp=deny"),
    ("ALLOW L7 OR L4 in one rule: request", "AP prod/a\nrules: [{to: [{operation: {methods: [GET]}}, {operation: {ports: [80]}}]}]", "m=POST", "allow"),
    ("DENY methods: needs HTTP, TCP denies", "AP prod/d\naction: DENY\nrules: [{to: [{operation: {methods: [DELETE]}}]}]", "", "needs tcp=deny"),
    ("DENY methods: GET allowed", "AP prod/d\naction: DENY\nrules: [{to: [{operation: {methods: [DELETE]}}]}]", "m=GET", "allow nocache"),
    ("DENY methods: DELETE denied", "AP prod/d\naction: DENY\nrules: [{to: [{operation: {methods: [DELETE]}}]}]", "m=DELETE", "deny by=prod/d"),
    ("DENY L7 with other source: decided", "AP prod/d\naction: DENY\nrules: [{from: [{source: {namespaces: [dev]}}], to: [{operation: {paths: [/x]}}]}]", "", "allow nocache"),
    ("DENY L7 plus ALLOW nothing: deny", "AP prod/d\naction: DENY\nrules: [{to: [{operation: {paths: [/x]}}]}]\nAP prod/a", "", "deny"),
    ("DENY L4 beats L7 ALLOW", "AP prod/d\naction: DENY\nrules: [{}]\nAP prod/a\nrules: [{to: [{operation: {paths: [/x]}}]}]", "", "deny by=prod/d"),
    ("AUDIT with L7 in TCP audits", "AP prod/au\naction: AUDIT\nrules: [{to: [{operation: {paths: [/x]}}]}]", "", "allow tcp=allow"),
    // PeerAuthentication
    ("default PERMISSIVE", "", "from=plain", "allow mtls=PERMISSIVE msrc=default"),
    ("mesh STRICT denies plaintext", "PA istio-system/mesh\nmtls: {mode: STRICT}", "from=plain", "deny nocache by=istio-system/mesh mtls=STRICT msrc=istio-system/mesh"),
    ("mesh STRICT allows mTLS", "PA istio-system/mesh\nmtls: {mode: STRICT}", "", "allow mtls=STRICT"),
    ("STRICT mTLS is never cached: every connection tunneled", "PA istio-system/mesh\nmtls: {mode: STRICT}", "", "allow nocache"),
    ("PERMISSIVE mTLS is cached", "PA istio-system/mesh\nmtls: {mode: PERMISSIVE}", "", "allow cache"),
    ("DISABLE mTLS is cached", "PA prod/ns\nmtls: {mode: DISABLE}", "", "allow cache"),
    ("a PERMISSIVE port of a STRICT workload is cached", "PA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: PERMISSIVE}}", "l:app=pay port=8080", "allow cache"),
    ("the STRICT port of a PERMISSIVE workload is not", "PA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: PERMISSIVE}\nportLevelMtls: {8080: {mode: STRICT}}", "l:app=pay port=8080", "allow nocache"),
    ("namespace over mesh", "PA istio-system/mesh\nmtls: {mode: STRICT}\nPA prod/ns\nmtls: {mode: PERMISSIVE}", "from=plain", "allow mtls=PERMISSIVE msrc=prod/ns"),
    ("namespace UNSET inherits mesh", "PA istio-system/mesh\nmtls: {mode: STRICT}\nPA prod/ns\nmtls: {mode: UNSET}", "from=plain", "deny msrc=istio-system/mesh"),
    ("workload over namespace", "PA prod/ns\nmtls: {mode: STRICT}\nPA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: DISABLE}", "l:app=pay from=plain", "allow mtls=DISABLE msrc=prod/w"),
    ("workload selector miss", "PA prod/ns\nmtls: {mode: STRICT}\nPA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: DISABLE}", "l:app=web from=plain", "deny msrc=prod/ns"),
    ("portLevelMtls for its port", "PA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: PERMISSIVE}}", "l:app=pay from=plain port=8080", "allow mtls=PERMISSIVE msrc=prod/w"),
    ("portLevelMtls other port", "PA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: PERMISSIVE}}", "l:app=pay from=plain port=80", "deny mtls=STRICT"),
    ("portLevelMtls UNSET inherits workload", "PA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: STRICT}\nportLevelMtls: {'80': {mode: UNSET}}", "l:app=pay from=plain port=80", "deny mtls=STRICT"),
    ("workload UNSET inherits namespace", "PA prod/ns\nmtls: {mode: STRICT}\nPA prod/w\nselector: {matchLabels: {app: pay}}", "l:app=pay from=plain", "deny msrc=prod/ns"),
    ("root selector is not mesh-wide", "PA istio-system/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: STRICT}", "l:app=pay from=plain", "allow msrc=default"),
    ("other namespace PA ignored", "PA dev/ns\nmtls: {mode: STRICT}", "from=plain", "allow"),
];

fn short(r: &crate::policy::PolicyRef) -> String {
    format!("{}/{}", r.namespace, r.name)
}

#[test]
fn istio_semantics_table() {
    assert!(CASES.len() >= 80, "{} cases", CASES.len());
    let mut failures = Vec::new();
    for (name, policies, request, expected) in CASES {
        let set: PolicySet = set(policies);
        let req = Req::parse(request);
        let target = Target {
            namespace: &req.namespace,
            labels: &req.labels,
        };
        let conn = req.connection();
        let decision = match req.request() {
            Some(http) => Some(set.evaluate_request(&target, &conn, &http)),
            None => match set.evaluate_connection(&target, &conn) {
                ConnectionDecision::Decided(d) => Some(d),
                ConnectionDecision::NeedsHttp { .. } => None,
            },
        };
        let mut problems = Vec::new();
        for word in expected.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            let ok = match (key, &decision) {
                ("needs", d) => d.is_none(),
                ("allow", Some(d)) => d.allowed,
                ("deny", Some(d)) => !d.allowed,
                ("cache", Some(d)) => d.cacheable,
                ("nocache", Some(d)) => !d.cacheable,
                ("by", Some(d)) => d.decided_by.as_ref().map_or("none".into(), short) == value,
                ("rule", Some(d)) => d.rule.map(|r| r.to_string()).as_deref() == Some(value),
                ("audit", Some(d)) => d.audited.iter().any(|a| short(a) == value),
                ("dry", Some(d)) => match (value, &d.dry_run) {
                    ("none", None) => true,
                    ("allow", Some(dry)) => dry.allowed == Some(true),
                    ("deny", Some(dry)) => dry.allowed == Some(false),
                    ("http", Some(dry)) => dry.allowed.is_none(),
                    _ => false,
                },
                ("mtls", _) => set.mtls_mode(&target, req.port).0.as_str() == value,
                ("msrc", _) => {
                    set.mtls_mode(&target, req.port)
                        .1
                        .as_ref()
                        .map_or("default".into(), short)
                        == value
                }
                ("tcp", _) => {
                    let tcp = set.evaluate_tcp(&target, &conn);
                    tcp.allowed == (value == "allow")
                }
                _ => false,
            };
            if !ok {
                problems.push(word);
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: expected {problems:?}, got {decision:#?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn explain_renders() {
    let set = set(ALLOW_FE);
    let req = Req::parse("");
    let labels = req.labels.clone();
    let target = Target {
        namespace: "prod",
        labels: &labels,
    };
    let explanation = set.explain(&target, &req.connection(), None);
    let text = crate::policy::cli::render_explain(&explanation);
    assert!(text.starts_with("ALLOW\n"), "{text}");
    assert!(text.contains("cacheable: yes"), "{text}");
    assert!(
        text.contains("decided by: AuthorizationPolicy prod/allow-fe (ALLOW), rule 0"),
        "{text}"
    );
    assert!(
        text.contains("mTLS mode: PERMISSIVE (from default)"),
        "{text}"
    );
    let json = serde_json::to_string(&explanation).unwrap();
    assert!(json.contains("\"allowed\":true"), "{json}");
}

#[test]
fn strict_fastpath_lets_strict_ports_be_cached_and_explain_says_what_is_encrypted() {
    let strict = "PA istio-system/mesh\nmtls: {mode: STRICT}";
    let req = Req::parse("");
    let target = Target {
        namespace: "prod",
        labels: &req.labels,
    };
    let tunneled = set(strict).explain(&target, &req.connection(), None);
    assert!(tunneled.decision.allowed && !tunneled.decision.cacheable);
    assert!(
        tunneled.decision.cache_reason.contains("STRICT"),
        "{tunneled:?}"
    );
    assert_eq!(tunneled.traffic, crate::policy::Traffic::Tunneled);
    assert!(tunneled.encrypted);
    let text = crate::policy::cli::render_explain(&tunneled);
    assert!(
        text.contains("encrypted: yes (every connection tunneled over mTLS"),
        "{text}"
    );

    let opted = set(strict).with_strict_fastpath(true);
    let fast = opted.explain(&target, &req.connection(), None);
    assert!(fast.decision.allowed && fast.decision.cacheable, "{fast:?}");
    assert_eq!(fast.traffic, crate::policy::Traffic::Fastpath);
    assert!(!fast.encrypted);
    let text = crate::policy::cli::render_explain(&fast);
    assert!(
        text.contains("encrypted: no (first connection tunneled"),
        "{text}"
    );

    let plain = Req::parse("from=plain");
    let permissive = set("").explain(&target, &plain.connection(), None);
    assert_eq!(permissive.traffic, crate::policy::Traffic::Plaintext);
    assert!(!permissive.encrypted);
}

#[test]
fn a_port_level_strict_mode_makes_the_workload_port_sensitive() {
    let per_port = set(
        "PA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: PERMISSIVE}\nportLevelMtls: {8080: {mode: STRICT}}",
    );
    let req = Req::parse("l:app=pay");
    let target = Target {
        namespace: "prod",
        labels: &req.labels,
    };
    assert!(per_port.port_sensitive(&target));
    assert!(
        !per_port
            .clone()
            .with_strict_fastpath(true)
            .port_sensitive(&target)
    );
    let whole = set("PA prod/w\nselector: {matchLabels: {app: pay}}\nmtls: {mode: STRICT}");
    assert!(!whole.port_sensitive(&target));
}

#[test]
fn explain_without_request_reports_needs_http() {
    let set = set("AP prod/a\nrules: [{to: [{operation: {methods: [GET]}}]}]");
    let req = Req::parse("");
    let target = Target {
        namespace: "prod",
        labels: &req.labels,
    };
    let explanation = set.explain(&target, &req.connection(), None);
    assert!(!explanation.decision.allowed);
    assert!(explanation.needs_http.is_some());
    let text = crate::policy::cli::render_explain(&explanation);
    assert!(text.contains("depends on HTTP"), "{text}");
    assert!(set.has_l7_for(&target, 80));
}

#[test]
fn decision_cost_is_independent_of_unrelated_policies() {
    let mut text = String::new();
    for i in 0..10_000 {
        text.push_str(&format!(
            "AP ns{}/p{i}\nselector: {{matchLabels: {{app: a{i}}}}}\nrules: [{{}}]\n",
            i % 500
        ));
    }
    let big = set(&text);
    let req = Req::parse("ns=ns7 l:app=a7");
    let target = Target {
        namespace: &req.namespace,
        labels: &req.labels,
    };
    // Only ns7's policy for app=a7 is a candidate.
    assert_eq!(big.applicable(&target), vec![big_id(&big, "ns7", "p7")]);
    assert!(matches!(
        big.evaluate_connection(&target, &req.connection()),
        ConnectionDecision::Decided(d) if d.allowed
    ));
}

fn big_id(set: &PolicySet, ns: &str, name: &str) -> u32 {
    set.summaries()
        .iter()
        .position(|s| s.namespace == ns && s.name == name)
        .unwrap() as u32
}
