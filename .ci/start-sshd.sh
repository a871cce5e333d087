#!/bin/sh
# Start an OpenSSH server on 127.0.0.1 for the ssh executor example (docs/examples/
# bioengine-executor-ssh): the "remote host" is this machine, reached as root over ssh.
# Idempotent: installs openssh-server if missing, creates host and client keys once under
# $BIOENGINE_SSHD_DIR (default /tmp/bioengine-sshd), and starts sshd only if it is not running.
# Needs root. Stop it with: kill "$(cat /tmp/bioengine-sshd/sshd.pid)".
#
# Files it leaves in the directory:
#   client_key, client_key.pub   the key tests log in with (ssh -i client_key -p PORT root@127.0.0.1)
#   sshd_config, sshd.pid, sshd.log, ssh_host_ed25519_key, authorized_keys
set -eu

DIR="${BIOENGINE_SSHD_DIR:-/tmp/bioengine-sshd}"
PORT="${BIOENGINE_SSHD_PORT:-2222}"
SSHD=/usr/sbin/sshd

if [ ! -x "$SSHD" ] || ! command -v ssh-keygen >/dev/null 2>&1 || ! command -v ssh >/dev/null 2>&1; then
    echo "start-sshd: installing openssh-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq openssh-server openssh-client >/dev/null
fi

mkdir -p "$DIR" /run/sshd
chmod 700 "$DIR"
[ -f "$DIR/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/ssh_host_ed25519_key"
[ -f "$DIR/client_key" ] || ssh-keygen -q -t ed25519 -N '' -C bioengine-ci -f "$DIR/client_key"
cp "$DIR/client_key.pub" "$DIR/authorized_keys"
chmod 600 "$DIR/authorized_keys"

cat >"$DIR/sshd_config" <<EOF
# Written by .ci/start-sshd.sh: key-only root login on loopback, for tests.
ListenAddress 127.0.0.1
Port $PORT
HostKey $DIR/ssh_host_ed25519_key
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 50:30:100
MaxSessions 50
EOF

client() {
    ssh -i "$DIR/client_key" -p "$PORT" -o BatchMode=yes -o ConnectTimeout=5 \
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
        root@127.0.0.1 true
}

if [ -f "$DIR/sshd.pid" ] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null && client 2>/dev/null; then
    echo "start-sshd: already running on 127.0.0.1:$PORT (pid $(cat "$DIR/sshd.pid"))"
    exit 0
fi

"$SSHD" -t -f "$DIR/sshd_config"
"$SSHD" -f "$DIR/sshd_config" -E "$DIR/sshd.log"   # daemonizes itself

i=0
until client 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -ge 50 ]; then
        echo "start-sshd: sshd does not accept logins on 127.0.0.1:$PORT" >&2
        tail -n 20 "$DIR/sshd.log" >&2 || true
        exit 1
    fi
    sleep 0.2
done
echo "start-sshd: sshd up on 127.0.0.1:$PORT (key $DIR/client_key)"
