#!/bin/sh
# Regenerates the certificates in this directory: chains rcgen cannot make (rcgen signs with
# neither SHA-1 nor MD5, and ring, its backend here, neither makes nor signs with RSA keys of
# 1024 bits), for the table tests and the handshake test of agent/src/tls/tests/.
#
# Real certificates from the openssl command-line tool (3.x), valid for 100 years from the day
# they are made. Run it from anywhere; it rewrites the files next to it. Only the leaves' private
# key is kept (the handshake test presents a leaf); it is a test key and protects nothing.
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

DAYS=36500
ID=spiffe://cluster.local/ns/prod/sa/frontend

cat > "$tmp/ca.ext" <<'END'
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
END
cat > "$tmp/leaf.ext" <<END
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=critical,URI:$ID
END

# self_signed_ca NAME DIGEST CN KEY-OPTIONS...: a self-signed CA certificate NAME.pem (its key
# stays in $tmp).
self_signed_ca() {
  name=$1 digest=$2 cn=$3
  shift 3
  openssl req -x509 "$@" -nodes -keyout "$tmp/$name.key" -out "$name.pem" -days "$DAYS" \
    -"$digest" -subj "/O=Latch tests/CN=$cn" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
}

# sign NAME CSR ISSUER DIGEST EXTFILE: NAME.pem from the request CSR, signed by ISSUER.pem's key.
sign() {
  openssl x509 -req -in "$2" -CA "$3.pem" -CAkey "$tmp/$3.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days "$DAYS" -"$4" -extfile "$5" -out "$1.pem" 2>/dev/null
}

# request KEYFILE CN: a request for a leaf (or CA) with that key and subject, in $tmp/CN.csr.
request() {
  openssl req -new -key "$1" -subj "/O=Latch tests/CN=$2" -out "$tmp/$2.csr"
}

# Trust anchors.
self_signed_ca rsa-ca sha256 "RSA 2048 CA" -newkey rsa:2048
self_signed_ca rsa1024-ca sha256 "RSA 1024 CA" -newkey rsa:1024
self_signed_ca sha1-ca sha1 "CA self-signed with SHA-1" -newkey rsa:2048
self_signed_ca ec-ca sha256 "P-256 CA" -newkey ec -pkeyopt ec_paramgen_curve:P-256

# An intermediate CA with a 1024-bit RSA key, under the good RSA CA.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out "$tmp/rsa1024-intermediate.key" 2>/dev/null
request "$tmp/rsa1024-intermediate.key" "RSA 1024 intermediate"
sign rsa1024-intermediate "$tmp/RSA 1024 intermediate.csr" rsa-ca sha256 "$tmp/ca.ext"

# The leaves: one P-256 key for all but the RSA 1024 leaf.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out leaf-key.pem
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out "$tmp/rsa1024-leaf.key" 2>/dev/null
for cn in "SHA-256 leaf" "SHA-1 leaf" "MD5 leaf" "ECDSA SHA-1 leaf" "leaf of the RSA 1024 CA" \
  "leaf of the SHA-1 CA" "leaf of the RSA 1024 intermediate"; do
  request leaf-key.pem "$cn"
done
request "$tmp/rsa1024-leaf.key" "RSA 1024 leaf"

sign leaf-sha256 "$tmp/SHA-256 leaf.csr" rsa-ca sha256 "$tmp/leaf.ext"
sign leaf-sha1 "$tmp/SHA-1 leaf.csr" rsa-ca sha1 "$tmp/leaf.ext"
sign leaf-md5 "$tmp/MD5 leaf.csr" rsa-ca md5 "$tmp/leaf.ext"
sign leaf-ecdsa-sha1 "$tmp/ECDSA SHA-1 leaf.csr" ec-ca sha1 "$tmp/leaf.ext"
sign leaf-rsa1024 "$tmp/RSA 1024 leaf.csr" rsa-ca sha256 "$tmp/leaf.ext"
sign leaf-of-rsa1024-ca "$tmp/leaf of the RSA 1024 CA.csr" rsa1024-ca sha256 "$tmp/leaf.ext"
sign leaf-of-sha1-ca "$tmp/leaf of the SHA-1 CA.csr" sha1-ca sha256 "$tmp/leaf.ext"
sign leaf-of-rsa1024-intermediate "$tmp/leaf of the RSA 1024 intermediate.csr" \
  rsa1024-intermediate sha256 "$tmp/leaf.ext"
rm -f ./*.srl
