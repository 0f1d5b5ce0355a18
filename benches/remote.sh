#!/usr/bin/env bash
# Remote roots at scale (#14, part 3), written to benches/results-remote.md
# (and the JSON on stdout): three ssh "hosts" (three ports of
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
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
target/release/examples/bench_remote --scratch "$T/scratch" --idle "$IDLE" \
    "host1:$FLEET" "host2:$FLEET.host2" "host3:$FLEET.host3" > "$T/out.json"
cat "$T/out.json"
# The report, made from the JSON only: never edited by hand.
python3 - "$T/out.json" "$FLEET" "$IDLE" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)" \
    "$(git rev-parse --short HEAD)" > benches/results-remote.md <<'PY'
import datetime, json, sys
r = json.load(open(sys.argv[1]))
fleet, idle, load0, load1, rev = sys.argv[2:7]
mib = lambda kib: f"{kib / 1024:.0f} MiB"
hosts = r["per_host"]
print("# Remote roots at scale (#14, part 3)\n")
print(f"Made by `benches/remote.sh {fleet} {idle}` at git `{rev}` (release build), "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average "
      f"{load0} at start, {load1} at end. Three ssh hosts (three ports of one sshd on "
      "localhost), each scanning its own copy of the fleet (host1 also a scratch directory "
      "of 2 images) through `cowshed agent --stdio`.\n")
print("| measure | value |\n|---|---|")
print(f"| time to first full forest, {r['hosts']} hosts, {r['images']:,} images grafted | "
      f"{r['first_full_forest_s']:.2f} s |")
for h in hosts:
    print(f"| {h['host']}: images, snapshot bytes, received after | {h['images']:,}, "
          f"{h['snapshot_bytes'] / 1e6:.2f} MB, {h['received_after_s']:.2f} s |")
print(f"| peak RSS, client | {mib(r['client_vmhwm_kib'])} |")
print(f"| peak RSS, each agent | {' / '.join(mib(k) for k in r['agents_vmhwm_kib'])} |")
print(f"| bytes per live update | {r['bytes_per_sizes_message']:.0f} (`sizes`, "
      f"{r['sizes_messages']} seen), plus {r['bytes_per_modified_message']:.0f} "
      f"(`modified`, {r['modified_messages']} seen) when the mtime moved |")
print(f"| bytes received while idle, {r['idle_seconds']:.0f} s | {r['idle_bytes_received']} |")
print(f"| idle CPU, client | {r['idle_cpu_pct_client']:.2f} % of a core |")
print(f"| idle CPU, ssh clients and control masters | {r['idle_cpu_pct_ssh_clients']:.2f} % |")
print(f"| idle CPU, agents together | {r['idle_cpu_pct_agents']:.2f} % of a core |")
print(f"| idle CPU, sshd sessions | {r['idle_cpu_pct_sshd_sessions']:.2f} % |")
PY
