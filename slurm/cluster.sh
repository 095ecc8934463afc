#!/usr/bin/env bash
# A one-node SLURM cluster on loopback for tests and demos: munge, MariaDB, slurmdbd, slurmctld, slurmd.
#
#   slurm/cluster.sh up       install what is missing (Debian packages, needs root), start everything; idempotent
#   slurm/cluster.sh down     stop everything (the state directory stays; `clean` removes it)
#   slurm/cluster.sh status   print what runs
#   slurm/cluster.sh env      print `export SLURM_CONF=...` for your shell: eval "$(slurm/cluster.sh env)"
#   slurm/cluster.sh clean    down, then remove the state directory
#
# Everything (configs, state, logs, pid files, the munge socket, the database) lives under one directory,
# $LAUNCHER_SLURM_DIR (default /tmp/launcher-slurm). Clients find the cluster through SLURM_CONF.
# Ports: $LAUNCHER_SLURM_PORT_BASE (default 16817) + 0 slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB.
# Job ids start at $LAUNCHER_SLURM_FIRST_JOB_ID (default 1 + 1000 x ((port base / 4) mod 10), 4001): two
# clusters on one machine with other port bases also get other job ids, so the rank port each job derives
# from its id (15000 + id mod 10000, launcher/env.py) differs too.
# Exit codes: 0 ok, 1 a daemon did not come up (its log is printed), 3 cannot run here (the reason is printed).
set -euo pipefail

DIR=${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm}
BASE=${LAUNCHER_SLURM_PORT_BASE:-16817}
FIRST_JOB_ID=${LAUNCHER_SLURM_FIRST_JOB_ID:-$(( 1 + 1000 * ((BASE / 4) % 10) ))}
CTLD_PORT=$BASE; SLURMD_PORT=$((BASE + 1)); DBD_PORT=$((BASE + 2)); DB_PORT=$((BASE + 3))
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core)
export SLURM_CONF=$CONF

say() { echo "[slurm-cluster] $*" >&2; }
cannot() { say "cannot run here: $*"; exit 3; }

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged slurmdbd mariadbd mariadb-install-db; do
    command -v "$cmd" > /dev/null || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || cannot "missing ${missing[*]}; installing Debian packages needs root (sudo $0 up)"
  command -v apt-get > /dev/null || cannot "missing ${missing[*]} and no apt-get (install SLURM 22.05+, munge, MariaDB)"
  say "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" > "$DIR/apt.log" 2>&1; then
    apt-get update -qq >> "$DIR/apt.log" 2>&1 || true
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >> "$DIR/apt.log" 2>&1 \
      || { tail -20 "$DIR/apt.log" >&2; cannot "apt-get install failed (log above, full log in $DIR/apt.log)"; }
  fi
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2> /dev/null; }

wait_for() {  # wait_for SECONDS LOGFILE WHAT COMMAND...
  local seconds=$1 log=$2 what=$3; shift 3
  for _ in $(seq $((seconds * 10))); do
    "$@" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  say "$what did not come up in ${seconds}s; last lines of $log:"
  tail -20 "$log" >&2 || true
  exit 1
}

write_configs() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  mkdir -p "$DIR"/{etc,munge,run,log,spool/ctld,spool/d,db}
  chmod 700 "$DIR/munge"
  cat > "$CONF" <<EOF
# Written by slurm/cluster.sh: a one-node test cluster on loopback.
ClusterName=launcher
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after 10 s instead of 120 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No systemd, no cgroups: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=15
MinJobAge=600
InactiveLimit=0
# Real accounting: submitit follows jobs through sacct. The password is the munge socket (see slurm/README.md).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$DIR/etc/slurmdbd.conf" <<EOF
# Written by slurm/cluster.sh. slurmdbd reads this file beside \$SLURM_CONF (it has no -f option).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
  alive "$DIR/munge/munged.pid" && return 0
  [[ -f $DIR/munge/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; }
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_for 10 "$DIR/log/munged.log" munged munge --socket="$MUNGE_SOCKET" -n
}

start_mariadb() {
  alive "$DIR/run/mariadb.pid" && return 0
  if [[ ! -d $DIR/db/mysql ]]; then
    mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=normal \
      --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1 \
      || { tail -20 "$DIR/log/mariadb-install.log" >&2; exit 1; }
  fi
  mariadbd --no-defaults --datadir="$DIR/db" --user=root --bind-address=127.0.0.1 --port="$DB_PORT" \
    --socket="$DIR/run/mariadb.sock" --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
    --skip-name-resolve --innodb-buffer-pool-size=32M > /dev/null 2>&1 &
  wait_for 30 "$DIR/log/mariadb.log" MariaDB mariadb --no-defaults -h 127.0.0.1 -P "$DB_PORT" -u root -e "select 1"
}

start_slurm() {
  if ! alive "$DIR/run/slurmdbd.pid"; then
    slurmdbd
    wait_for 30 "$DIR/log/slurmdbd.log" slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  fi
  if ! alive "$DIR/run/slurmctld.pid"; then
    slurmctld
    wait_for 30 "$DIR/log/slurmctld.log" slurmctld scontrol ping
  fi
  if ! alive "$DIR/run/slurmd.pid"; then
    slurmd
  fi
  wait_for 30 "$DIR/log/slurmd.log" "node $(hostname -s)" \
    bash -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
}

stop_pid() {  # stop_pid PIDFILE NAME
  local pidfile=$1 pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill "$pid" 2> /dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2> /dev/null || true
  rm -f "$pidfile"
}

case ${1:-} in
  up)
    mkdir -p "$DIR"
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurm
    say "up: $(sinfo -h -o '%P %D node(s) %C cpus (alloc/idle/other/total)')"
    echo "export SLURM_CONF=$CONF"
    ;;
  down)
    # Jobs first, so no task outlives the daemons.
    if alive "$DIR/run/slurmctld.pid"; then scancel --full --quiet --user "$(id -un)" 2> /dev/null || true; fi
    for name in slurmd slurmctld slurmdbd mariadb; do stop_pid "$DIR/run/$name.pid"; done
    stop_pid "$DIR/munge/munged.pid"
    say "down"
    ;;
  status)
    for f in "$DIR"/run/*.pid "$DIR"/munge/munged.pid; do
      [[ -e $f ]] || continue
      if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
    done
    alive "$DIR/run/slurmctld.pid" && sinfo
    ;;
  env)
    echo "export SLURM_CONF=$CONF"
    ;;
  clean)
    bash "$0" down
    rm -rf "$DIR"
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
