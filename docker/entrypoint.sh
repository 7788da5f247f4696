#!/bin/sh
# The container's entrypoint, run by tini (PID 1): `tini -- emp-entrypoint emp-machine ...`.
#
# Started as root (the image has no USER): the state volume is handed to the unprivileged user, since Railway
# (and a bind mount) mounts it owned by root whatever the image's /data was, then the command is exec'd as that
# user. Every step is an exec, so tini's child is the command itself and gets tini's SIGTERM.
# Started as any other user (`docker run --user`, Railway's RAILWAY_RUN_UID): the command is exec'd as it is.
#   EMP_CONTAINER_USER   the user to run as (default: emp, made by Dockerfile.machine)
set -eu

if [ "$(id -u)" != 0 ]; then
  exec "$@"
fi

user=${EMP_CONTAINER_USER:-emp}
uid=$(id -u "$user" 2>/dev/null) && gid=$(id -g "$user") || {
  echo "emp-entrypoint: there is no user $user in this image (EMP_CONTAINER_USER names the user to run as)" >&2
  exit 2
}

# The volume (Railway says where it is mounted; /data by default) and the state directory, when they exist:
# chown only when not the user's already (a fresh volume), so a later boot costs nothing.
for dir in "${RAILWAY_VOLUME_MOUNT_PATH:-/data}" "${EMP_MACHINE__STATE_DIR:-}"; do
  case "$dir" in "" | /) continue ;; esac
  if [ -d "$dir" ] && [ "$(stat -c %u "$dir")" != "$uid" ]; then
    chown -R "$uid:$gid" "$dir" ||
      echo "emp-entrypoint: could not give $dir to user $user (uid $uid); the machine may be unable to write" \
           "its state there (a read-only mount?)" >&2
  fi
done

if [ "${HOME:-/root}" = /root ]; then
  HOME=$(getent passwd "$user" | cut -d: -f6)
  export HOME
fi
exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"
