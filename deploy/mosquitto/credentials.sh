#!/usr/bin/env bash
# Create the credentials of a Ferry deployment in OUT_DIR (default deploy/secrets, git-ignored):
#   passwords     the Mosquitto password file (hashed), one entry per user of deploy/mosquitto/acl
#   <user>.env    FERRY_BROKER__USERNAME/PASSWORD and the S3 keys, for that Ferry process
#                 (systemd EnvironmentFile=, compose env_file:)
#   minio.env     MINIO_ROOT_USER/PASSWORD for the MinIO container
# Secrets are random; an existing OUT_DIR is left untouched (delete it to rotate everything).
# Needs mosquitto_passwd (Debian package mosquitto).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../secrets}
if [[ -e $out/passwords ]]; then
  echo "credentials: $out/passwords exists; keeping it (remove $out to create new secrets)"
  exit 0
fi
command -v mosquitto_passwd >/dev/null || { echo "credentials: mosquitto_passwd not found (apt install mosquitto)" >&2; exit 1; }
secret() { head -c 24 /dev/urandom | base64 | tr -d '/+='; }

mkdir -p "$out"
chmod 700 "$out"
umask 077
s3_user=ferry
s3_secret=$(secret)
printf 'MINIO_ROOT_USER=%s\nMINIO_ROOT_PASSWORD=%s\n' "$s3_user" "$s3_secret" >"$out/minio.env"
: >"$out/passwords"
for user in $(awk '$1 == "user" { print $2 }' "$here/acl"); do
  password=$(secret)
  mosquitto_passwd -b "$out/passwords" "$user" "$password"
  printf 'FERRY_BROKER__USERNAME=%s\nFERRY_BROKER__PASSWORD=%s\nFERRY_S3__ACCESS_KEY=%s\nFERRY_S3__SECRET_KEY=%s\n' \
    "$user" "$password" "$s3_user" "$s3_secret" >"$out/$user.env"
done
echo "credentials: wrote $out ($(ls "$out" | wc -l) files)"
