#!/usr/bin/env bash
# Makes the test certificates (a CA and a server certificate for 127.0.0.1,
# ::1 and localhost, valid for 100 years). They are for the TLS tests only:
# the private keys are public, in this repository.
#   tests/certs/make.sh   (writes here: ca.pem; server.pem and server.key,
#   and server2.pem and server2.key, a second one for the same names (the
#   reload tests);
#   client.pem and client.key, a client certificate the CA signed;
#   rogue.pem and rogue.key, a self-signed client certificate; other.key, a
#   key that belongs to no certificate; nameless.pem and nameless.key, a
#   client certificate from the CA without a common name, and twonames.pem
#   and twonames.key, one with two; revoked.pem and revoked.key, a client
#   certificate from the CA that crl.pem, the CA's revocation list, revokes;
#   crl-none.pem, the same list before it did; ca2.pem, a second CA, and
#   ca2-client.pem and ca2-client.key, a client certificate from it)
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/ca.key" -out ca.pem -days 36500 -subj "/CN=Tern test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/server.key" -out "$tmp/server.csr" -subj "/CN=localhost"
cat >"$tmp/ext.cnf" <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost
EXT
openssl x509 -req -in "$tmp/server.csr" -CA ca.pem -CAkey "$tmp/ca.key" -CAcreateserial -CAserial "$tmp/ca.srl" \
    -out server.pem -days 36500 -extfile "$tmp/ext.cnf"
# PKCS#8, the form every TLS library reads.
openssl pkcs8 -topk8 -nocrypt -in "$tmp/server.key" -out server.key
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/server2.key" -out "$tmp/server2.csr" -subj "/CN=localhost"
openssl x509 -req -in "$tmp/server2.csr" -CA ca.pem -CAkey "$tmp/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -out server2.pem -days 36500 -extfile "$tmp/ext.cnf"
openssl pkcs8 -topk8 -nocrypt -in "$tmp/server2.key" -out server2.key
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out other.key
# A client certificate from the CA, and one from nobody.
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/client.key" -out "$tmp/client.csr" -subj "/CN=sensor-1"
cat >"$tmp/client.cnf" <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EXT
openssl x509 -req -in "$tmp/client.csr" -CA ca.pem -CAkey "$tmp/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -out client.pem -days 36500 -extfile "$tmp/client.cnf"
openssl pkcs8 -topk8 -nocrypt -in "$tmp/client.key" -out client.key
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/rogue.key" -out rogue.pem -days 36500 -subj "/CN=rogue" \
    -addext "extendedKeyUsage=clientAuth"
openssl pkcs8 -topk8 -nocrypt -in "$tmp/rogue.key" -out rogue.key
# Client certificates from the CA that name no user, or two.
for subject in "nameless:/O=Tern test" "twonames:/CN=sensor-1/CN=sensor-2" "revoked:/CN=sensor-9"; do
    name=${subject%%:*}
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$tmp/$name.key" -out "$tmp/$name.csr" -subj "${subject#*:}"
    openssl x509 -req -in "$tmp/$name.csr" -CA ca.pem -CAkey "$tmp/ca.key" -CAcreateserial \
        -CAserial "$tmp/ca.srl" -out "$name.pem" -days 36500 -extfile "$tmp/client.cnf"
    openssl pkcs8 -topk8 -nocrypt -in "$tmp/$name.key" -out "$name.key"
done
# The CA's revocation lists: revoking nothing, then revoked.pem only.
cat >"$tmp/ca.cnf" <<CNF
[ca]
default_ca = test_ca
[test_ca]
database = $tmp/index.txt
crlnumber = $tmp/crlnumber
default_md = sha256
default_crl_days = 36500
CNF
touch "$tmp/index.txt"
echo 01 >"$tmp/crlnumber"
openssl ca -config "$tmp/ca.cnf" -keyfile "$tmp/ca.key" -cert ca.pem -gencrl -out crl-none.pem
openssl ca -config "$tmp/ca.cnf" -keyfile "$tmp/ca.key" -cert ca.pem -revoke revoked.pem
openssl ca -config "$tmp/ca.cnf" -keyfile "$tmp/ca.key" -cert ca.pem -gencrl -out crl.pem
# A second CA with a client certificate of its own (and no revocation list).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/ca2.key" -out ca2.pem -days 36500 -subj "/CN=Tern test CA 2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/ca2-client.key" -out "$tmp/ca2-client.csr" -subj "/CN=sensor-2"
openssl x509 -req -in "$tmp/ca2-client.csr" -CA ca2.pem -CAkey "$tmp/ca2.key" -CAcreateserial \
    -CAserial "$tmp/ca2.srl" -out ca2-client.pem -days 36500 -extfile "$tmp/client.cnf"
openssl pkcs8 -topk8 -nocrypt -in "$tmp/ca2-client.key" -out ca2-client.key
