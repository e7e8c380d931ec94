#!/usr/bin/env bash
# slurm/local/start.sh - install (if missing), configure and start a REAL SLURM cluster on this one
# machine, for skinhpc's integration tests and for trying `jobs/launch.py` without a cluster
# (Debian/Ubuntu packages: slurm + munge + slurmdbd/mariadb so that `sacct` works).
# No systemd needed: every daemon is started directly; the PIDs of the daemons that THIS script
# started are saved in $SLURM_LOCAL_DIR/pids/ so slurm/local/stop.sh stops exactly those and nothing
# that was already running. Idempotent: re-running it only (re)starts what is not running, and
# returns once every node is idle and a test job ran.
#
# The cluster always has SLURM_LOCAL_NODES (default 2) virtual nodes node1..nodeN on this host (one
# slurmd each, names added to /etc/hosts so MASTER_ADDR resolves): 1-node tasks run side by side
# and the multi-node DDP test gets its 2 nodes from the same cluster. Partitions: `debug` (default)
# and `high`, whose jobs preempt (requeue, after sending the job's --signal) jobs in `debug`.
#
# Settings (environment variables):
#   SLURM_LOCAL_DIR=/tmp/slurm-local  state, spool, logs, pid files
#   SLURM_LOCAL_NODES=2               number of virtual nodes node[1-N]
#   SLURM_LOCAL_CPUS=<nproc>          CPUs advertised PER NODE (may exceed the real count)
#   SLURM_LOCAL_MEM_MB=<auto>         RealMemory PER NODE (default: 80% of RAM / nodes)
#   SLURM_LOCAL_ACCOUNTING=1          1: mariadb + slurmdbd so `sacct` works (submitit needs sacct
#                                     to notice cancelled/killed jobs); 0: no accounting
#   SLURM_LOCAL_CLEAN=0               1: wipe previous controller state (jobs) before starting
#   SLURM_LOCAL_CLUSTER=local         ClusterName
# Needs root. Writes /etc/slurm/slurm.conf (+ slurmdbd.conf), the default path of every client.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
ACCT=${SLURM_LOCAL_ACCOUNTING:-1}
CLUSTER=${SLURM_LOCAL_CLUSTER:-local}
HOST=$(uname -n); HOST=${HOST%%.*}
if [ -z "${SLURM_LOCAL_MEM_MB:-}" ] || [ "${SLURM_LOCAL_MEM_MB}" = auto ]; then
  MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 / NODES ))
else
  MEM=$SLURM_LOCAL_MEM_MB
fi
FIRST_PORT=17001                     # slurmd ports: 17001 .. 17000+NODES
ETC=/etc/slurm

log() { echo "[slurm/local/start.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
if [ "$(id -u)" != 0 ]; then  # root is needed (apt, /etc/slurm, daemons): retry through sudo
  command -v sudo >/dev/null 2>&1 || die "must run as root (or with sudo available)"
  exec sudo -E bash "$0" "$@"
fi

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# pid of a daemon we started earlier (if still alive and still that program)
our_pid() {
  local f="$DIR/pids/$1.pid" p
  [ -s "$f" ] || return 1
  p=$(cat "$f")
  alive "$p" && grep -q "$2" "/proc/$p/cmdline" 2>/dev/null && { echo "$p"; return 0; }
  rm -f "$f"; return 1
}
stop_ours() { # stop_ours <pidfile-name> <cmdline substring>: TERM (then KILL) a daemon we started
  local p; p=$(our_pid "$1" "$2") || return 0
  log "stopping $1 (pid $p)"; kill "$p"
  for _ in $(seq 100); do alive "$p" || break; sleep 0.2; done
  alive "$p" && kill -9 "$p"; rm -f "$DIR/pids/$1.pid"
}
wait_for() { # wait_for <seconds> <description> <command...>
  local n=$(( $1 * 5 )) what=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out waiting for $what"
}

T_START=$(date +%s)
# ---------------------------------------------------------------- 1. packages
PKGS=(slurmctld slurmd slurm-client munge)
NEED=(slurmctld slurmd sbatch munged)
if [ "$ACCT" = 1 ]; then PKGS+=(slurmdbd mariadb-server); NEED+=(slurmdbd mariadbd mysqladmin); fi
missing=0; for b in "${NEED[@]}"; do command -v "$b" >/dev/null 2>&1 || missing=1; done
if [ "$missing" = 1 ]; then
  log "installing ${PKGS[*]} (apt)"; mkdir -p "$DIR/log"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >""$DIR/log/apt.log"" 2>&1 \
    || { tail -30 "$DIR/log/apt.log"; die "apt-get install failed"; }
fi
mkdir -p "$DIR"/{pids,log,ctld,etc}
if [ "${SLURM_LOCAL_CLEAN:-0}" = 1 ]; then  # forget all jobs: stop slurm daemons, wipe state (+ db below)
  for f in "$DIR"/pids/slurmd-*.pid; do [ -e "$f" ] && stop_ours "$(basename "$f" .pid)" slurmd; done
  stop_ours slurmctld slurmctld; stop_ours slurmdbd slurmdbd
  rm -rf "${DIR:?}/ctld" "$DIR"/slurmd-*; mkdir -p "$DIR/ctld"
fi

# ---------------------------------------------------------------- 2. munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  install -d -o munge -g munge -m 0700 /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key --force 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if ! our_pid munged munged >/dev/null; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 "munged pid file" test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/pids/munged.pid"
  fi
  wait_for 10 "munge to work" bash -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------- 3. mariadb (accounting)
if [ "$ACCT" = 1 ]; then
  install -d -o mysql -g root -m 0755 /run/mysqld
  if ! mysqladmin ping >/dev/null 2>&1; then
    if [ ! -d /var/lib/mysql/mysql ]; then
      log "initialising mariadb datadir"
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$DIR/log/mariadb-install.log" 2>&1
    fi
    log "starting mariadbd"
    # NB: pid/log paths must be writable by user mysql (mariadbd crashed with paths under a root-owned dir)
    nohup /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
      --pid-file=/run/mysqld/mysqld.pid >"$DIR/log/mariadb.log" 2>&1 </dev/null &
    echo $! >"$DIR/pids/mariadb.pid"
    wait_for 60 "mariadb" mysqladmin ping
  fi
  # Fresh controller state restarts job ids at 1: drop the old accounting db too, otherwise sacct
  # (and so submitit) sees old jobs with the same ids. (slurmdbd must not be running for that.)
  if [ ! -e "$DIR/ctld/job_state" ] && ! our_pid slurmdbd slurmdbd >/dev/null; then
    mysql -u root -e "DROP DATABASE IF EXISTS slurm_acct_db_local"
  fi
  mysql -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db_local;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-local-pass';
GRANT ALL ON slurm_acct_db_local.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
fi

# ---------------------------------------------------------------- 4. config
# Node names must resolve (submitit's TorchDistributedEnvironment uses the job's first node as
# MASTER_ADDR): node1..nodeN are added to /etc/hosts, pointing at this machine.
NAMES=(); for i in $(seq 1 "$NODES"); do NAMES+=("node$i"); done
if [ "$NODES" = 1 ]; then NODESPEC=node1; PORTS=$FIRST_PORT
else NODESPEC="node[1-$NODES]"; PORTS="$FIRST_PORT-$((FIRST_PORT + NODES - 1))"; fi
for n in "${NAMES[@]}"; do
  getent hosts "$n" >/dev/null || { echo "127.0.0.1 $n # skinhpc slurm/local/start.sh" >>/etc/hosts; log "added $n to /etc/hosts"; }
done
if [ "$ACCT" = 1 ]; then
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
  ACCT_CONF="AccountingStorageType=accounting_storage/none"
fi
cat >"$DIR/etc/slurm.conf" <<EOF
# generated by skinhpc slurm/local/start.sh - single-machine cluster, do not edit (re-run the script)
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire seconds (default 120) before they may start again
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
# let the node advertise more CPUs/memory than the hardware has (no INVAL "Low CPUs")
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd-%n
SlurmctldPidFile=$DIR/pids/slurmctld.pid
SlurmdPidFile=$DIR/pids/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=6817
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
$ACCT_CONF
# preemption: jobs in 'high' requeue jobs in 'debug'; the job's --signal (submitit: USR2) is sent
# at preemption time, then GraceTime seconds later the job is killed and requeued
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODESPEC NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$PORTS CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10
EOF
cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm-local-pass
StorageLoc=slurm_acct_db_local
PidFile=$DIR/pids/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
EOF

mkdir -p "$ETC"
if [ -f "$ETC/slurm.conf" ] && ! grep -q "generated by skinhpc slurm/local/start.sh" "$ETC/slurm.conf"; then
  cp "$ETC/slurm.conf" "$ETC/slurm.conf.bak.$(date +%s)"; log "backed up foreign $ETC/slurm.conf"
fi
changed=0
cmp -s "$DIR/etc/slurm.conf" "$ETC/slurm.conf" || changed=1
install -m 0644 "$DIR/etc/slurm.conf" "$ETC/slurm.conf"
install -m 0600 -o root -g root "$DIR/etc/slurmdbd.conf" "$ETC/slurmdbd.conf"   # must be 0600, owner SlurmUser
unset SLURM_CONF

if [ "$changed" = 1 ]; then  # config changed: restart the slurm daemons we own
  for f in "$DIR"/pids/slurmd-*.pid; do [ -e "$f" ] && stop_ours "$(basename "$f" .pid)" slurmd; done
  stop_ours slurmctld slurmctld
fi

# ---------------------------------------------------------------- 5. daemons
if [ "$ACCT" = 1 ] && ! our_pid slurmdbd slurmdbd >/dev/null; then
  log "starting slurmdbd"
  slurmdbd                              # daemonizes, writes $DIR/pids/slurmdbd.pid
  wait_for 30 "slurmdbd" sacctmgr -n show cluster
fi
if ! our_pid slurmctld slurmctld >/dev/null; then
  log "starting slurmctld"
  slurmctld                             # daemonizes, writes $DIR/pids/slurmctld.pid
  wait_for 30 "slurmctld" bash -c 'scontrol ping | grep -q "is UP"'
fi
for n in "${NAMES[@]}"; do
  if ! our_pid "slurmd-$n" slurmd >/dev/null; then
    log "starting slurmd -N $n"
    mkdir -p "$DIR/slurmd-$n"             # SlurmdSpoolDir (%n = node name); must exist first
    slurmd -N "$n"                      # daemonizes, writes $DIR/pids/slurmd-$n.pid
  fi
done

# ---------------------------------------------------------------- 6. nodes idle?
nodes_ready() {
  local bad
  bad=$(sinfo -h -N -o '%N %T' | sort -u | awk '$2 !~ /^(idle|mixed|allocated|completing)/')
  [ -z "$bad" ] && [ "$(sinfo -h -N -o %N | sort -u | wc -l)" = "$NODES" ]
}
for _ in $(seq 150); do
  nodes_ready && break
  # DOWN/DRAIN/INVAL after an unclean stop ("Node unexpectedly rebooted", "Not responding"...): resume
  for n in $(sinfo -h -N -o '%N %T' | awk '$2 ~ /down|drain|fail/ && $2 !~ /\*$/ {print $1}' | sort -u); do
    scontrol update nodename="$n" state=resume 2>/dev/null || true
  done
  sleep 0.2
done
nodes_ready || { sinfo -N -l; sinfo -R; tail -20 "$DIR"/log/slurm*.log; die "nodes not idle"; }

timeout 60 srun -N1 -n1 true || die "srun smoke test failed"
if [ "$ACCT" = 1 ]; then timeout 30 sacct -n -X -o JobID -S now-1hour >/dev/null || die "sacct not working"; fi
log "cluster '$CLUSTER' up in $(( $(date +%s) - T_START ))s: $NODES node(s) x $CPUS CPUs, accounting=$ACCT"
sinfo
