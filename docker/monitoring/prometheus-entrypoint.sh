#!/bin/sh
# Prometheus entrypoint of the compose `monitoring` profile: writes the gateway's API key into
# a file Prometheus reads for its bearer token (prometheus.yml: credentials_file), so the key
# lives in neither the config file nor Prometheus's environment.
#   usage: prometheus-entrypoint.sh KEY_FILE COMMAND [ARGS...]   (the key comes in VBON_API_KEY)
set -eu
key_file=$1
shift
umask 077
# printf, not echo: no trailing newline, no backslash processing of the key.
printf '%s' "${VBON_API_KEY:-}" > "$key_file"
unset VBON_API_KEY
exec "$@"
