#!/usr/bin/env bash
# Makes a private certificate authority and one server certificate it signs, for TLS between
# sibyl's roles (and on the gateway, for clients that trust the same authority):
#
#   deploy/make-tls.sh DIR NAME...
#
# writes DIR/ca.crt (the authority: give it to every role as --tls-ca / SIBYL_TLS_CA, and to
# clients), DIR/tls.crt and DIR/tls.key (the certificate and its key: --tls-cert, --tls-key).
# The certificate names every NAME (the host names the roles call each other by), localhost
# and 127.0.0.1; it is valid for 365 days (SIBYL_TLS_DAYS). The authority's own key is not
# kept: a new certificate means a new authority. The file names are those of a cert-manager
# Certificate's Secret, so one made by cert-manager can stand in. Needs openssl.
set -euo pipefail

(($# >= 2)) || { echo "usage: $0 DIR NAME..." >&2; exit 2; }
command -v openssl >/dev/null || { echo "$0: needs openssl" >&2; exit 1; }
dir=$1
shift
days=${SIBYL_TLS_DAYS:-365}
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do san="$san,DNS:$name"; done

curve=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${curve[@]}" -keyout "$work/ca.key" -out "$work/ca.crt" -days "$days" \
  -subj "/CN=sibyl private CA" 2>/dev/null
openssl req "${curve[@]}" -keyout "$work/tls.key" -out "$work/tls.csr" -subj "/CN=$1" 2>/dev/null
printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$work/ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
  -CAcreateserial -days "$days" -extfile "$work/ext" -out "$work/tls.crt" 2>/dev/null
install -m 0644 "$work/ca.crt" "$dir/ca.crt"
install -m 0644 "$work/tls.crt" "$dir/tls.crt"
install -m 0600 "$work/tls.key" "$dir/tls.key"
echo "$dir: ca.crt, tls.crt, tls.key for $san (valid $days days)"
