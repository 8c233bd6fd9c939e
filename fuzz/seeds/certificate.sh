#!/bin/sh
# Regenerates the certificate target's trust anchor (agent/src/fuzzing/root.pem, in the bundle
# latch::fuzzing verifies against) and its hand-written seeds in fuzz/seeds/certificate/: a
# P-256 chain (leaf + intermediate with name constraints, signed by that root) that verifies,
# and the single leaves of agent/src/tls/testdata (one verifies, the others break one rule).
# Made with the openssl command-line tool (3.x), valid for 100 years. Seeds are DER: the target
# cuts its input into DER elements, leaf first. The root's key is thrown away.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$(dirname "$here")")
out="$here/certificate"
testdata="$repo/agent/src/tls/testdata"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

DAYS=36500
cat > "$tmp/inter.ext" <<'END'
basicConstraints=critical,CA:TRUE,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
nameConstraints=critical,permitted;URI:cluster.local
END
cat > "$tmp/leaf.ext" <<'END'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=critical,URI:spiffe://cluster.local/ns/prod/sa/payment
END

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/root.key" \
  -out "$repo/agent/src/fuzzing/root.pem" -days "$DAYS" -sha256 -subj "/O=Latch fuzzing/CN=root" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null
for name in inter leaf; do
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/$name.key"
  openssl req -new -key "$tmp/$name.key" -subj "/O=Latch fuzzing/CN=$name" -out "$tmp/$name.csr"
done
openssl x509 -req -in "$tmp/inter.csr" -CA "$repo/agent/src/fuzzing/root.pem" -CAkey "$tmp/root.key" \
  -set_serial 0x01 -days "$DAYS" -sha256 -extfile "$tmp/inter.ext" -out "$tmp/inter.pem" 2>/dev/null
openssl x509 -req -in "$tmp/leaf.csr" -CA "$tmp/inter.pem" -CAkey "$tmp/inter.key" \
  -set_serial 0x02 -days "$DAYS" -sha256 -extfile "$tmp/leaf.ext" -out "$tmp/leaf.pem" 2>/dev/null

der() { openssl x509 -in "$1" -outform DER; }
{ der "$tmp/leaf.pem"; der "$tmp/inter.pem"; } > "$out/chain-p256"
der "$tmp/leaf.pem" > "$out/leaf-without-intermediate"
for leaf in leaf-sha256 leaf-sha1 leaf-md5 leaf-ecdsa-sha1 leaf-rsa1024 leaf-of-sha1-ca; do
  der "$testdata/$leaf.pem" > "$out/$leaf"
done
{ der "$testdata/leaf-of-rsa1024-intermediate.pem"; der "$testdata/rsa1024-intermediate.pem"; } \
  > "$out/chain-rsa1024-intermediate"
