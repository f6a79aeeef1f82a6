#!/bin/sh
# Node entrypoint: host keys on first start, an empty list of running containers,
# then replace this shell by sshd (exec), so sshd is PID 1 and receives SIGTERM.
set -e
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
node=${NODE_NAME:-$(hostname)}
running="/app/nodes/${node}_running.txt"
[ -e "$running" ] || : > "$running"
# The file lives in the host's nodes/ directory (a bind mount), and we are root: left
# alone it would be root's, and a teacher's `echo web >> nodes/node-1_running.txt` as a
# normal user would fail. Give it to whoever owns nodes/ on the host. `|| true`: some
# bind mounts (Docker Desktop's file sharing) refuse chown, the node must start anyway.
chown "$(stat -c %u:%g /app/nodes)" "$running" || true
exec /usr/sbin/sshd -D -e "$@"
