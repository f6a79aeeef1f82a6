#!/bin/sh
# Node entrypoint: host keys on first start, an empty list of running containers,
# then replace this shell by sshd (exec), so sshd is PID 1 and receives SIGTERM.
set -e
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
node=${NODE_NAME:-$(hostname)}
[ -e "/app/nodes/${node}_running.txt" ] || : > "/app/nodes/${node}_running.txt"
exec /usr/sbin/sshd -D -e "$@"
