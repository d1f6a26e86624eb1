#!/usr/bin/env bash
# Create the credentials of a Ferry deployment in OUT_DIR (default deploy/secrets, git-ignored):
#   passwords          the Mosquitto password file (hashed) of the component listener: one entry
#                      per user of deploy/mosquitto/acl
#   passwords-devices  the same for the device listener: one entry per user of acl-devices
#   <user>.env         FERRY_BROKER__USERNAME/PASSWORD for that Ferry process (systemd
#                      EnvironmentFile=, compose env_file:), and S3 keys only for the logins that
#                      use S3, each its own: executors (edge nodes), the scheduler (reads image
#                      manifests) and the operator (pushes images, reads checkpoints)
#   minio.env          MINIO_ROOT_USER/PASSWORD for the MinIO container, for no Ferry process
#   minio-users.sh     creates the bucket and those S3 users in MinIO, with the policies of
#                      deploy/minio/ (copied to minio-policies/)
#   tls/               a CA (ca.pem; its key ca.key stays here), the server certificate of the
#                      broker and MinIO (server.pem/.key; names mosquitto, minio, localhost,
#                      127.0.0.1 and $FERRY_TLS_HOSTS, space-separated) and a client certificate
#                      per login (<user>.pem/.key, CN = the login) for mutual TLS; made by
#                      tools/stack/pki.py (Python with the `cryptography` package: $PYTHON)
# Secrets are random; an existing OUT_DIR is left untouched (delete it to rotate everything).
# Needs mosquitto_passwd (Debian package mosquitto) and python3 with `cryptography`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../secrets}
if [[ -e $out/passwords ]]; then
  echo "credentials: $out/passwords exists; keeping it (remove $out to create new secrets)"
  exit 0
fi
command -v mosquitto_passwd >/dev/null || { echo "credentials: mosquitto_passwd not found (apt install mosquitto)" >&2; exit 1; }
python=${PYTHON:-python3}
"$python" -c 'import cryptography' 2>/dev/null || { echo "credentials: $python has no cryptography (apt install python3-cryptography, or PYTHON=.venv/bin/python)" >&2; exit 1; }
secret() { head -c 24 /dev/urandom | base64 | tr -d '/+='; }
users_of() { awk '$1 == "user" { print $2 }' "$1"; }

mkdir -p "$out"
chmod 700 "$out"
umask 077
printf 'MINIO_ROOT_USER=%s\nMINIO_ROOT_PASSWORD=%s\n' ferry-root "$(secret)" >"$out/minio.env"
users_script=$out/minio-users.sh
printf '#!/bin/sh\n# Run once with mc aliased to the MinIO root (mc alias set ferry ...): alias=${1:-ferry}\nset -eu\na=${1:-ferry}\nmc mb --ignore-existing "$a/ferry"\n' >"$users_script"
mkdir -p "$out/minio-policies"
for policy in "$here"/../minio/*.json; do
  name=$(basename "$policy" .json)
  cp "$policy" "$out/minio-policies/"
  printf 'mc admin policy create "$a" %s "$(dirname "$0")/minio-policies/%s.json"\n' "$name" "$name" >>"$users_script"
done
chmod 700 "$users_script"

# policy_of USER: the MinIO policy of a component login, or nothing (no S3 access at all).
policy_of() {
  case $1 in
    statestore) ;;
    scheduler) echo ferry-scheduler ;;
    operator) echo ferry-operator ;;
    *) echo ferry-executor ;;  # every other component login is an edge node
  esac
}

: >"$out/passwords"
for user in $(users_of "$here/acl"); do
  password=$(secret)
  mosquitto_passwd -b "$out/passwords" "$user" "$password"
  printf 'FERRY_BROKER__USERNAME=%s\nFERRY_BROKER__PASSWORD=%s\n' "$user" "$password" >"$out/$user.env"
  policy=$(policy_of "$user")
  if [[ -n $policy ]]; then
    s3_secret=$(secret)
    printf 'FERRY_S3__ACCESS_KEY=%s\nFERRY_S3__SECRET_KEY=%s\n' "ferry-$user" "$s3_secret" >>"$out/$user.env"
    printf 'mc admin user add "$a" %s %s\nmc admin policy attach "$a" %s --user %s\n' \
      "ferry-$user" "$s3_secret" "$policy" "ferry-$user" >>"$users_script"
  fi
done

# Devices: their own listener (port 8884), their own password file, and no S3 key.
: >"$out/passwords-devices"
for user in $(users_of "$here/acl-devices"); do
  password=$(secret)
  mosquitto_passwd -b "$out/passwords-devices" "$user" "$password"
  printf 'FERRY_BROKER__USERNAME=%s\nFERRY_BROKER__PASSWORD=%s\nFERRY_BROKER__PORT=8884\n' \
    "$user" "$password" >"$out/$user.env"
done

hosts=(--host mosquitto --host minio)
for host in ${FERRY_TLS_HOSTS:-}; do hosts+=(--host "$host"); done
clients=()
for user in $(users_of "$here/acl") $(users_of "$here/acl-devices"); do clients+=(--client "$user"); done
"$python" "$here/../../tools/stack/pki.py" "$out/tls" "${hosts[@]}" "${clients[@]}"
# Certificates are public; keys stay 0600. Mosquitto drops root right after reading its config,
# before it opens the listeners' files, so the broker image's user (mosquitto, uid 1883) must
# own the server key (MinIO's container runs as root and reads it anyway).
chmod 644 "$out"/tls/*.pem
if [[ $(id -u) == 0 ]]; then
  chown 1883:1883 "$out/tls/server.key"
else
  echo "credentials: run as root, or chown 1883 $out/tls/server.key for the Mosquitto image"
fi
echo "credentials: wrote $out ($(ls "$out" | wc -l) files)"
