#!/bin/sh
# Regenerates the certificates in this directory for tests/tests/interop.rs: a trust hierarchy of
# the shapes istiod (and ztunnel's test CA) issue, which Latch's own development CA never makes:
#
# - root.pem: a self-signed RSA 2048 root whose subject is only `O=cluster.local`, as istiod's
#   self-signed CA;
# - intermediate.pem: an RSA 2048 intermediate CA under it, as a plugged-in (cacerts) istiod's;
# - <name>.pem: each workload's leaf then the intermediate (the chain a workload presents), the
#   leaf with an EMPTY subject and a CRITICAL URI SAN (the SPIFFE ID), keyUsage
#   digitalSignature and keyEncipherment, extendedKeyUsage serverAuth and clientAuth, as istiod
#   issues workload certificates; frontend's key is RSA 2048 (istiod's default), payment's
#   ECDSA P-256 (ztunnel's CSRs);
# - <name>-key.pem: its private key (PKCS#8). Test keys: they protect nothing.
#
# Real certificates from the openssl command-line tool (3.x), valid for 100 years from the day
# they are made. Run it from anywhere; it rewrites the files next to it.
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
DAYS=36500

cat > "$tmp/root.ext" <<'END'
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,digitalSignature
subjectKeyIdentifier=hash
END
cat > "$tmp/intermediate.ext" <<'END'
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
END

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tmp/root.key" -out root.pem -days "$DAYS" \
  -sha256 -subj "/O=cluster.local" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,digitalSignature" 2>/dev/null

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/intermediate.key" 2>/dev/null
openssl req -new -key "$tmp/intermediate.key" -subj "/O=cluster.local/CN=Intermediate CA" \
  -out "$tmp/intermediate.csr"
openssl x509 -req -in "$tmp/intermediate.csr" -CA root.pem -CAkey "$tmp/root.key" \
  -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -sha256 -extfile "$tmp/intermediate.ext" \
  -out intermediate.pem 2>/dev/null

# leaf NAME SERVICE-ACCOUNT KEY-ALGORITHM-OPTIONS...
leaf() {
  name=$1 sa=$2
  shift 2
  openssl genpkey "$@" -out "$name-key.pem" 2>/dev/null
  cat > "$tmp/$name.ext" <<END
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=critical,URI:spiffe://cluster.local/ns/prod/sa/$sa
END
  # An empty subject: a request needs one name, the certificate gets none (-subj /).
  openssl req -new -key "$name-key.pem" -subj "/CN=x" -out "$tmp/$name.csr"
  openssl x509 -req -in "$tmp/$name.csr" -CA intermediate.pem -CAkey "$tmp/intermediate.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -sha256 -extfile "$tmp/$name.ext" \
    -subj "/" -out "$tmp/$name-leaf.pem" 2>/dev/null
  cat "$tmp/$name-leaf.pem" intermediate.pem > "$name.pem"
}

leaf frontend frontend -algorithm RSA -pkeyopt rsa_keygen_bits:2048
leaf payment payment -algorithm EC -pkeyopt ec_paramgen_curve:P-256
