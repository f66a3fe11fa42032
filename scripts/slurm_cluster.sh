#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, started natively (no systemd): munged, slurmctld and slurmd from
# Debian's packages with a generated slurm.conf, one partition over this machine's CPUs. CI uses it to run
# real `hardware=slurm` sweeps (see .ci/run); a developer can run it too.
#
#   scripts/slurm_cluster.sh start [DIR]   # prints the config path: export SLURM_CONF=<it> for sbatch/squeue
#   scripts/slurm_cluster.sh stop [DIR]
#
# DIR (default .cache/slurm-cluster) holds slurm.conf, the munge key and socket, the daemons' state, spool,
# logs and pid files. Environment: SLURM_PARTITION (metalab), SLURM_CPUS (this machine's, `nproc`),
# SLURMCTLD_PORT (6817) and SLURMD_PORT (6818), the ports Debian's defaults use: change them where another
# cluster runs on the machine. Root only (slurmd starts jobs as their users); the packages are installed from
# Debian if missing. Clients find the cluster through SLURM_CONF, and jobs inherit it (sbatch exports the
# submitting environment), so nothing is written outside DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
COMMAND="${1:-}"
DIR="${2:-$ROOT/.cache/slurm-cluster}"
SLURM_PARTITION="${SLURM_PARTITION:-metalab}"
SLURM_CPUS="${SLURM_CPUS:-$(nproc)}"
SLURMCTLD_PORT="${SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${SLURMD_PORT:-6818}"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

install_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null && return
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  local host memory
  host="$(hostname -s)"
  memory="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"  # MB; slurmd refuses a node it overstates
  # No cgroups (a container has no writable cgroup tree) and no accounting daemon: linuxproc tracks a job's
  # processes, CR_CPU lets jobs share the node one CPU each, the jobcomp file records what ended how.
  cat > "$DIR/slurm.conf" <<EOF
ClusterName=metalab
SlurmctldHost=$host
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
KillWait=10
MinJobAge=300
NodeName=$host CPUs=$SLURM_CPUS RealMemory=$memory State=UNKNOWN
PartitionName=$SLURM_PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  [ "$(id -u)" = 0 ] || die "run as root: slurmd starts jobs as their users"
  install_slurm
  running "$DIR/slurmctld.pid" && die "a cluster from $DIR is already running: \`$0 stop $DIR\` first"
  mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool"
  chmod 755 "$DIR" "$DIR/munge"  # munged refuses a socket folder others can write to
  [ -s "$DIR/munge/munge.key" ] || (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 \
    status=none)
  write_conf
  munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start: $DIR/munge/munged.log"
  export SLURM_CONF="$DIR/slurm.conf"
  slurmctld -f "$SLURM_CONF" || die "slurmctld did not start: $DIR/slurmctld.log"
  slurmd -f "$SLURM_CONF" || die "slurmd did not start: $DIR/slurmd.log"
  # Ready when the node takes jobs: idle in its partition.
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -p "$SLURM_PARTITION" -o %t 2>/dev/null)" = idle ]; then
      echo "$SLURM_CONF"
      return
    fi
    sleep 1
  done
  tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
  stop
  die "the node did not become idle within 60 s (logs above)"
}

stop_daemon() {
  local pidfile="$1" pid
  [ -s "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

stop() {
  if [ -s "$DIR/slurmctld.pid" ] && [ -f "$DIR/slurm.conf" ]; then
    # Jobs still queued or running would outlive their daemons: cancel them first.
    SLURM_CONF="$DIR/slurm.conf" scancel --partition="$SLURM_PARTITION" 2>/dev/null || true
  fi
  stop_daemon "$DIR/slurmd.pid"
  stop_daemon "$DIR/slurmctld.pid"
  stop_daemon "$DIR/munge/munged.pid"
}

case "$COMMAND" in
  start) mkdir -p "$DIR"; DIR="$(cd "$DIR" && pwd)"; start ;;
  stop) if [ -d "$DIR" ]; then DIR="$(cd "$DIR" && pwd)"; stop; fi ;;
  *) die "usage: $0 start|stop [DIR]" ;;
esac
