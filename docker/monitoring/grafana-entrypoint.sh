#!/bin/sh
# Grafana entrypoint of the compose `monitoring` profile. Anonymous visitors see the dashboards
# read-only (Viewer). Admin sign-in exists only when VBON_GRAFANA_ADMIN_PASSWORD is set; without
# it the login form and basic auth are off and the admin password is random, so no default
# admin/admin is ever reachable.
#   usage: grafana-entrypoint.sh COMMAND [ARGS...]   (the image's /run.sh)
set -eu
if [ -n "${VBON_GRAFANA_ADMIN_PASSWORD:-}" ]; then
  GF_SECURITY_ADMIN_PASSWORD=$VBON_GRAFANA_ADMIN_PASSWORD
else
  GF_SECURITY_ADMIN_PASSWORD=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  GF_AUTH_DISABLE_LOGIN_FORM=true
  GF_AUTH_BASIC_ENABLED=false
  export GF_AUTH_DISABLE_LOGIN_FORM GF_AUTH_BASIC_ENABLED
fi
export GF_SECURITY_ADMIN_PASSWORD
unset VBON_GRAFANA_ADMIN_PASSWORD
exec "$@"
