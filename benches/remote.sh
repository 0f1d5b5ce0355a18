#!/usr/bin/env bash
# Remote roots at scale (#14, part 3): three ssh "hosts" (three ports of
# one sshd on localhost, started here with throw-away keys), each scanning
# its own copy of the FLEET directory through `cowshed agent --stdio` (one
# directory seen by all three would be shared storage, shown once: the
# copies, FLEET.host2 and FLEET.host3, are made once, sparse), and one client
# (examples/bench_remote.rs) measuring time to the first full forest, RSS
# of both ends, bytes per live update and idle CPU. Not a test: it asserts
# nothing. Needs openssh-server (/usr/sbin/sshd) and qemu-img/qemu-io.
#
# usage: benches/remote.sh [FLEET_DIR] [IDLE_SECS]
#   FLEET_DIR defaults to /work/fixtures10k/fleet (10,000 images; build it
#   with FLEET_N=10000 ../shared/bench/make-fixtures.sh DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
FLEET=$(realpath "${1:-/work/fixtures10k/fleet}")
IDLE=${2:-60}
cargo build --release --quiet --bin cowshed --example bench_remote
BIN=$PWD/target/release/cowshed
T=$(mktemp -d /tmp/cowshed-remote-bench.XXXXXX)
SSHD_PID=
cleanup() {
    for h in host1 host2 host3; do
        ssh -F "$T/ssh_config" -o "ControlPath=$T/ctl/%C" -O exit "$h" 2>/dev/null || true
    done
    [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
ssh-keygen -q -t ed25519 -N '' -f "$T/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$T/client_key"
cp "$T/client_key.pub" "$T/authorized_keys"
mkdir -p /run/sshd "$T/scratch"
ports=()
for _ in 1 2 3; do
    ports+=("$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')")
done
{
    for p in "${ports[@]}"; do echo "Port $p"; done
    cat <<CONF
ListenAddress 127.0.0.1
HostKey $T/host_key
AuthorizedKeysFile $T/authorized_keys
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin yes
PidFile $T/sshd.pid
LogLevel ERROR
CONF
} > "$T/sshd_config"
i=0
for h in host1 host2 host3; do
    cat >> "$T/ssh_config" <<CONF
Host $h
  HostName 127.0.0.1
  Port ${ports[$i]}
  User $(id -un)
  IdentityFile $T/client_key
  IdentitiesOnly yes
  UserKnownHostsFile $T/known_hosts
  StrictHostKeyChecking accept-new
  LogLevel ERROR
CONF
    i=$((i + 1))
done
/usr/sbin/sshd -D -f "$T/sshd_config" -E "$T/sshd.log" &
SSHD_PID=$!
for p in "${ports[@]}"; do
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break
        sleep 0.1
    done
done
for h in host2 host3; do
    if [ ! -d "$FLEET.$h" ]; then
        echo "copying $FLEET to $FLEET.$h (once)" >&2
        cp -a --sparse=always "$FLEET" "$FLEET.$h.partial"
        mv "$FLEET.$h.partial" "$FLEET.$h"
    fi
done
qemu-img create -q -f qcow2 "$T/scratch/base.qcow2" 1G
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$T/scratch/growing.qcow2"
export COWSHED_SSH_CONFIG=$T/ssh_config COWSHED_SSH_CONTROL_DIR=$T/ctl
export COWSHED_REMOTE_COMMAND="env COWSHED_STATE_DIR=$T/state $BIN"
echo "fleet: $FLEET ($(find "$FLEET" -type f | wc -l) files), 3 hosts, idle ${IDLE}s, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
target/release/examples/bench_remote --scratch "$T/scratch" --idle "$IDLE" \
    "host1:$FLEET" "host2:$FLEET.host2" "host3:$FLEET.host3"
