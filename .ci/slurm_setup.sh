#!/usr/bin/env bash
# A SLURM "cluster" for CI on Debian 12 (Slurm 22.05 from Debian), no systemd needed: node $HOST in
# partition debug (the one-node tests), and a second node $HOST-n2 on the same machine (a second
# slurmd, Debian's SLURM is built for several per host), both nodes in partition multi, each
# with one logical GPU declared as a GRES (no device: the multi-node tests run verl on the CPU
# and ask SLURM for one GPU per node).
# Adapted for this project's CI (.ci/run) from the team's reference recipe: no demo action (the
# test suite drives the workflow through SLURM itself), and finished jobs stay visible to
# `scontrol show job` for an hour (MinJobAge), which the SLURM test reads.
# Tested on Debian 12 (bookworm), root, 2 CPUs, 24 GiB, Firecracker VM, cgroup v1/hybrid.
#
# Usage (as root):
#   ./slurm_setup.sh start     # install (if needed) + start munged, [mariadbd, slurmdbd,] slurmctld, slurmd; smoke test
#   ./slurm_setup.sh status
#   ./slurm_setup.sh stop      # stop only the daemons this script started (by PID file, after checking the name),
#                              # and remove what it added (the second node's /etc/hosts line)
# Safe to run "start" repeatedly: it installs only missing packages, rewrites configs, restarts
# daemons only when their config changed, and starts only daemons that are not running.
#
# Environment knobs:
#   WITH_SLURMDBD=0|1   0 (default): no accounting -> `sacct` fails ("Slurm accounting storage is disabled");
#                       the snakemake profile MUST then set `slurm-status-command: squeue`.
#                       1: also install mariadb-server + slurmdbd (DB datadir under $STATE) so `sacct` works
#                       and the plugin's defaults (status command sacct) work unchanged. (~+15 s)
#   PROCTRACK=linuxproc|cgroup   default linuxproc (works in unprivileged containers). cgroup works on this VM
#                       (cgroup v1) but then memory is enforced: mem_mb=100 OOM-kills snakemake's job step; use >=200.
#   STATE=<temp dir>  logs of smoke tests, mariadb datadir, demo workflow, venv
#   PARTITION=debug  CLUSTER=ci  ACCOUNT=ci  CI_USERS="root"  (users added to the accounting DB)
#   PYTHON=python3 (>=3.11 for snakemake 9)  VENV=$STATE/venv
set -euo pipefail

ACTION=${1:-start}
WITH_SLURMDBD=${WITH_SLURMDBD:-0}
PROCTRACK=${PROCTRACK:-linuxproc}
STATE=${STATE:-${TMPDIR:-/tmp}/slurm-ci}
PARTITION=${PARTITION:-debug}
CLUSTER=${CLUSTER:-ci}
ACCOUNT=${ACCOUNT:-ci}
CI_USERS=${CI_USERS:-root}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$STATE/venv}
DB_PASS=${DB_PASS:-slurmci}
export DEBIAN_FRONTEND=noninteractive

HOST=$(hostname -s)
NODE2=${NODE2:-$HOST-n2}          # the second node: a second slurmd on this machine
MULTI_PARTITION=${MULTI_PARTITION:-multi}
HOSTS_MARK="# slurm_setup.sh: second node"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
CG_CONF=/etc/slurm/cgroup.conf
GRES_CONF=/etc/slurm/gres.conf
MYSQL_DIR=$STATE/mysql
MYSQL_SOCK=$MYSQL_DIR/mysqld.sock
MYSQL_PID=$MYSQL_DIR/mysqld.pid

log() { printf '[slurm-setup %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (or via sudo)"

# ---- process helpers: only ever touch the PID recorded in a pid file, and only if its name matches
pid_of() {  # pid_of PIDFILE COMM -> prints pid if that process is alive and named COMM
  local f=$1 comm=$2 p
  [ -s "$f" ] || return 1
  p=$(tr -dc 0-9 < "$f")
  [ -n "$p" ] && [ "$(ps -p "$p" -o comm= 2>/dev/null)" = "$comm" ] || return 1
  echo "$p"
}
stop_pidfile() {  # stop_pidfile PIDFILE COMM
  local f=$1 comm=$2 p _
  if p=$(pid_of "$f" "$comm"); then
    kill -TERM "$p"
    for _ in $(seq 100); do   # up to 20 s
      [ "$(ps -p "$p" -o stat= 2>/dev/null | cut -c1)" = "" ] && break
      [ "$(ps -p "$p" -o stat= 2>/dev/null | cut -c1)" = "Z" ] && break
      sleep 0.2
    done
    if pid_of "$f" "$comm" >/dev/null && [ "$(ps -p "$p" -o stat= | cut -c1)" != Z ]; then
      log "$comm ($p) did not stop after SIGTERM, sending SIGKILL"; kill -KILL "$p" || true
    fi
    log "stopped $comm (pid $p)"
  fi
  rm -f "$f"
}
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 d=$2 _; shift 2
  for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${t}s waiting for: $d"
}

install_pkgs() {
  local want=(slurm-wlm munge) missing=() p
  [ "$WITH_SLURMDBD" = 1 ] && want+=(slurmdbd mariadb-server)
  for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    # postinst tries to start services; without systemd/with policy-rc.d this is just skipped (harmless)
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then   # Debian's postinst normally creates it
    log "creating munge key"; mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge   # systemd's RuntimeDirectory= normally does this
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged already running"; return; fi
  rm -f /run/munge/munged.pid
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force   # forks into background; --force: tolerate stale socket
  wait_for 10 "munged" bash -c 'munge -n | unmunge'
}

write_if_changed() {  # write_if_changed DEST MODE OWNER < content ; returns 0 if changed
  local dest=$1 mode=$2 owner=$3 tmp; tmp=$(mktemp)
  cat > "$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then rm -f "$tmp"; return 1; fi
  install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$dest"; rm -f "$tmp"; return 0
}

write_slurm_conf() {
  local hw cpus sockets cores threads realmem mem acct gather proct task
  hw=$(slurmd -C | head -1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
  cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
  threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
  realmem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=${MEM_MB:-$((realmem * 85 / 100))}     # leave headroom; RealMemory > actual would DRAIN the node
  if [ "$WITH_SLURMDBD" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
    gather=jobacct_gather/linux
  else
    acct="AccountingStorageType=accounting_storage/none"
    gather=jobacct_gather/none
  fi
  if [ "$PROCTRACK" = cgroup ]; then
    proct=proctrack/cgroup; task=task/cgroup,task/affinity
    [ "$WITH_SLURMDBD" = 1 ] && gather=jobacct_gather/cgroup
  else
    proct=proctrack/linuxproc; task=task/none
  fi
  CONF_CHANGED=0
  write_if_changed "$CONF" 0644 root:root <<EOF && CONF_CHANGED=1 || true
# Generated by slurm_setup.sh: single-node CI cluster on $HOST
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): the chained
# training test requeues its job, and 120 s of idling per part is most of that test's time
AuthInfo=cred_expire=${CRED_EXPIRE_S:-30}
CredType=cred/munge
MpiDefault=none
ProctrackType=$proct
TaskPlugin=$task
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
# several slurmd on one host: each node its own pid file, spool and log (%n: the node's name)
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd-%n
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
# a pass every 5 s (defaults 60 and 30): a requeued job starts when it may, not up to a minute later
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
JobAcctGatherType=$gather
$acct
JobCompType=jobcomp/none
# >= 3 x snakemake's slurm-init-seconds-before-status-checks, else the plugin ignores
# slurm-status-command=squeue and falls back to sacct; an hour, so that the test can still read
# every finished job of a run with scontrol show job (no accounting database here)
MinJobAge=3600
InactiveLimit=0
KillWait=10
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
# one logical GPU per node (gres.conf below): what a job asks for with --gres=gpu:1; the
# multi-node tests run verl on the CPU
GresTypes=gpu
NodeName=$HOST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6818 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:1 State=UNKNOWN
NodeName=$NODE2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6828 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=$MULTI_PARTITION Nodes=$HOST,$NODE2 Default=NO MaxTime=INFINITE State=UP
EOF
  # each slurmd reports what gres.conf gives it: without one, or with a Count and no File, SLURM
  # 22.05's gpu plugin reports no GPU and the node is drained ("gres/gpu count reported lower
  # than configured (0 < 1)"); /dev/null stands in for the device (nothing opens it)
  write_if_changed "$GRES_CONF" 0644 root:root <<EOF && CONF_CHANGED=1 || true
# Generated by slurm_setup.sh: one logical GPU per node (no device: /dev/null stands in)
AutoDetect=off
NodeName=$HOST,$NODE2 Name=gpu File=/dev/null
EOF
  if [ "$PROCTRACK" = cgroup ]; then
    write_if_changed "$CG_CONF" 0644 root:root <<'EOF' && CONF_CHANGED=1 || true
CgroupPlugin=autodetect
ConstrainCores=yes
ConstrainRAMSpace=yes
EOF
  fi
  install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
  install -d -o root -g root "/var/lib/slurm/slurmd-$HOST" "/var/lib/slurm/slurmd-$NODE2"
  # the second node's name resolves to this machine (Ray and srun --nodelist use node names)
  grep -q "$HOSTS_MARK" /etc/hosts || echo "127.0.0.1 $NODE2 $HOSTS_MARK" >> /etc/hosts
}

start_dbd() {
  [ "$WITH_SLURMDBD" = 1 ] || return 0
  install -d -o mysql -g mysql "$MYSQL_DIR"
  if [ ! -d "$MYSQL_DIR/data/mysql" ]; then
    log "initialising MariaDB datadir $MYSQL_DIR/data"
    install -d -o mysql -g mysql "$MYSQL_DIR/data"
    mariadb-install-db --user=mysql --datadir="$MYSQL_DIR/data" --auth-root-authentication-method=socket \
      --skip-test-db > "$MYSQL_DIR/install.log" 2>&1
  fi
  if ! pid_of "$MYSQL_PID" mariadbd >/dev/null; then
    log "starting mariadbd (datadir $MYSQL_DIR/data, 127.0.0.1:3306)"
    # --no-defaults: ignore /etc/mysql/*; do not touch the packaged /var/lib/mysql instance
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$MYSQL_DIR/data" --socket="$MYSQL_SOCK" \
      --pid-file="$MYSQL_PID" --port=3306 --bind-address=127.0.0.1 --log-error="$MYSQL_DIR/error.log" \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    wait_for 30 "mariadbd" mariadb --no-defaults -S "$MYSQL_SOCK" -uroot -e 'select 1'
  fi
  mariadb --no-defaults -S "$MYSQL_SOCK" -uroot <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
  local changed=0
  # StorageHost must be 127.0.0.1 (TCP): "localhost" makes libmariadb use the default socket /run/mysqld/...
  write_if_changed "$DBD_CONF" 0600 slurm:slurm <<EOF && changed=1 || true
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  if [ $changed = 1 ]; then stop_pidfile /run/slurmdbd.pid slurmdbd; fi
  if ! pid_of /run/slurmdbd.pid slurmdbd >/dev/null; then
    log "starting slurmdbd"; /usr/sbin/slurmdbd    # daemonises
  fi
  wait_for 30 "slurmdbd answering sacctmgr" sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster%64 | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  sacctmgr -n list account format=account%64 | grep -qw "$ACCOUNT" ||
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=ci Organization=ci >/dev/null
  local u
  for u in $CI_USERS; do
    sacctmgr -n list assoc user="$u" account="$ACCOUNT" format=user%64 | grep -qw "$u" ||
      sacctmgr -i add user "$u" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
  done
}

stop_slurmds() {
  stop_pidfile /run/slurmd.pid slurmd   # the single slurmd of an earlier version of this script
  stop_pidfile "/run/slurmd-$HOST.pid" slurmd
  stop_pidfile "/run/slurmd-$NODE2.pid" slurmd
}

start_slurm() {
  if [ "$CONF_CHANGED" = 1 ]; then   # config changed -> restart what is running
    stop_slurmds
    stop_pidfile /run/slurmctld.pid slurmctld
  fi
  if ! pid_of /run/slurmctld.pid slurmctld >/dev/null; then
    log "starting slurmctld"; /usr/sbin/slurmctld    # daemonises; add -D and & to keep it in the foreground
  fi
  wait_for 30 "slurmctld" scontrol ping
  local node _ st
  for node in "$HOST" "$NODE2"; do
    if ! pid_of "/run/slurmd-$node.pid" slurmd >/dev/null; then
      log "starting slurmd for node $node"; /usr/sbin/slurmd -N "$node"
    fi
  done
  for node in "$HOST" "$NODE2"; do
    st=""
    for _ in $(seq 150); do
      st=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -1)
      case "$st" in idle|mixed|allocated|completing) break ;;
        drain*|down*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;; esac
      sleep 0.2
    done
    case "$st" in idle|mixed|allocated|completing) ;; *) die "node $node state '$st' (see /var/log/slurm/*.log)";; esac
  done
  sinfo >&2
}

wait_completed() {  # wait_completed JOBID WHAT: dies unless the job completes within 60 s
  local job=$1 what=$2 st="" _
  for _ in $(seq 300); do
    st=$(scontrol show job "$job" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    case "$st" in COMPLETED) return 0 ;; FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL)
      die "$what $job ended $st" ;; esac
    sleep 0.2
  done
  die "$what $job not completed after 60 s (state '$st')"
}

smoke_test() {
  install -d "$STATE"
  local out
  # (sbatch --wait would also do, but it polls slowly: ~10 s for a 0 s job)
  out=$(sbatch --parsable -p "$PARTITION" -t 1 --mem=50 -o "$STATE/smoke-%j.out" \
        --wrap 'echo "smoke ok on $(hostname) job $SLURM_JOB_ID"') || die "sbatch failed"
  wait_completed "$out" "smoke job"
  log "$(cat "$STATE/smoke-$out.out")"
  if [ "$WITH_SLURMDBD" = 1 ]; then sacct -j "$out" -X -n -o JobID,State,Account >&2; fi
  # the two nodes: one task and one (logical) GPU on each
  out=$(sbatch --parsable -p "$MULTI_PARTITION" -N 2 --ntasks-per-node=1 --gres=gpu:1 -t 1 --mem=50 \
        -o "$STATE/smoke-%j.out" --wrap 'srun sh -c "echo \$SLURMD_NODENAME"') || die "sbatch (2 nodes) failed"
  wait_completed "$out" "two-node smoke job"
  [ "$(sort "$STATE/smoke-$out.out" | tr '\n' ' ')" = "$(printf '%s\n' "$HOST" "$NODE2" | sort | tr '\n' ' ')" ] ||
    die "two-node smoke job $out ran on: $(tr '\n' ' ' < "$STATE/smoke-$out.out")"
  log "two-node smoke ok: job $out ran a task on $HOST and on $NODE2"
}

stop_all() {
  stop_slurmds
  stop_pidfile /run/slurmctld.pid slurmctld
  stop_pidfile /run/slurmdbd.pid slurmdbd
  stop_pidfile "$MYSQL_PID" mariadbd
  stop_pidfile /run/munge/munged.pid munged
  # proctrack/cgroup leaves empty v1 cgroup dirs behind; remove them (rmdir only removes empty cgroups)
  local c
  for c in /sys/fs/cgroup/*/slurm_"$HOST" /sys/fs/cgroup/slurm_"$HOST" /sys/fs/cgroup/*/slurm_"$NODE2" \
           /sys/fs/cgroup/slurm_"$NODE2"; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  if grep -q "$HOSTS_MARK" /etc/hosts; then   # the second node's name (edited in place: /etc/hosts may be a mount)
    local kept; kept=$(grep -v "$HOSTS_MARK" /etc/hosts); printf '%s\n' "$kept" > /etc/hosts
  fi
}

status_all() {
  local spec f c
  for spec in /run/munge/munged.pid:munged "$MYSQL_PID":mariadbd /run/slurmdbd.pid:slurmdbd \
              /run/slurmctld.pid:slurmctld "/run/slurmd-$HOST.pid":slurmd "/run/slurmd-$NODE2.pid":slurmd; do
    f=${spec%:*}; c=${spec##*:}
    if p=$(pid_of "$f" "$c"); then echo "$c running (pid $p)"; else echo "$c not running"; fi
  done
  sinfo 2>/dev/null || true
}

case "$ACTION" in
  start)
    T0=$(date +%s)
    install_pkgs
    start_munge
    write_slurm_conf
    start_dbd
    start_slurm
    smoke_test
    log "SLURM ready in $(( $(date +%s) - T0 )) s (WITH_SLURMDBD=$WITH_SLURMDBD PROCTRACK=$PROCTRACK)"
    ;;
  stop) stop_all ;;
  status) status_all ;;
  *) die "usage: $0 [start|status|stop]" ;;
esac
