#!/usr/bin/env bash
# Certificates and a token for trying TLS, mutual TLS and bearer tokens (docs/security.md), made with openssl:
#
#   scripts/tls-dev-certs.sh [DIR] [NAME ...]      # DIR default ./tls; NAMEs the server answers to
#
# Writes into DIR (created; files 0600 where secret):
#   ca.pem, ca.key           a CA made for the purpose (keep ca.key away from the servers)
#   server.pem, server.key   the server's certificate, for localhost, 127.0.0.1, `server` and the NAMEs
#   client.pem, client.key   a client certificate of the same CA (mutual TLS: --tls-client-ca ca.pem)
#   token                    a random bearer token (--auth-token-file on the server, --token-file on clients)
# For a real deployment, certificates come from your CA or cert-manager; the server takes any PEM pair.
set -euo pipefail
dir=${1:-tls}
shift || true
mkdir -p "$dir"
umask 077
days=365
sans="DNS:localhost,IP:127.0.0.1,DNS:server"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ ]]; then sans+=",IP:$name"; else sans+=",DNS:$name"; fi
done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=xorserve dev CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
issue() {  # issue NAME SUBJECT EXTENSIONS...
  local name=$1 subject=$2
  shift 2
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$subject" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -out "$dir/$name.pem" -extfile <(printf '%s\n' "$@") 2>/dev/null
  rm -f "$dir/$name.csr"
}
issue server "/CN=xorserve server" "subjectAltName=$sans" "extendedKeyUsage=serverAuth"
issue client "/CN=xorserve client" "extendedKeyUsage=clientAuth"
rm -f "$dir/ca.srl"
openssl rand -hex 24 >"$dir/token"
chmod 644 "$dir/ca.pem" "$dir/server.pem" "$dir/client.pem"
echo "wrote $dir/: ca.pem ca.key server.pem server.key client.pem client.key token (server names: ${sans//DNS:/})"
