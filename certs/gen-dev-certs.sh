#!/usr/bin/env bash
# Makes a local development CA and a certificate signed by it, for wss:// on this machine.
#
#   certs/gen-dev-certs.sh [OUTDIR] [NAME...]      (defaults: certs/, "localhost 127.0.0.1 ::1")
#
# Writes OUTDIR/ca.crt + ca.key (made once, reused) and OUTDIR/server.crt + server.key.
# Trust ca.crt in your browser or with `curl --cacert certs/ca.crt`. Environment:
#   KEY_TYPE=ec|rsa|ed25519   server key type (default ec; written as SEC1, PKCS#1, PKCS#8)
#   PREFIX=server             file name prefix for the certificate and key
#   DAYS=825                  validity
set -euo pipefail
out=${1:-$(dirname "$0")}
[ $# -gt 0 ] && shift
names=${*:-localhost 127.0.0.1 ::1}
key_type=${KEY_TYPE:-ec}
prefix=${PREFIX:-server}
days=${DAYS:-825}
mkdir -p "$out"
umask 077
if [ ! -f "$out/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.crt" -days "$days" -subj "/CN=wsgate development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
case $key_type in
  ec) openssl ecparam -name prime256v1 -genkey -noout -out "$out/$prefix.key" ;;
  rsa) openssl genrsa -traditional -out "$out/$prefix.key" 2048 2>/dev/null ;;
  ed25519) openssl genpkey -algorithm ed25519 -out "$out/$prefix.key" ;;
  *) echo "KEY_TYPE must be ec, rsa or ed25519" >&2; exit 2 ;;
esac
san=""
for n in $names; do
  case $n in
    *:*|[0-9]*.[0-9]*.[0-9]*.[0-9]*) san="$san,IP:$n" ;;
    *) san="$san,DNS:$n" ;;
  esac
done
ext=$(mktemp)
trap 'rm -f "$ext" "$out/$prefix.csr"' EXIT
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' "${san#,}" > "$ext"
first=${names%% *}
openssl req -new -key "$out/$prefix.key" -subj "/CN=$first" -out "$out/$prefix.csr"
openssl x509 -req -in "$out/$prefix.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days "$days" -out "$out/$prefix.crt" -extfile "$ext" 2>/dev/null
echo "wrote $out/$prefix.crt and $out/$prefix.key (CA: $out/ca.crt)"
