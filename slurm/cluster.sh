#!/usr/bin/env bash
# A SLURM cluster on this machine for tests and demos: munge, MariaDB, slurmdbd, slurmctld, slurmd.
#
#   slurm/cluster.sh up       install what is missing (Debian packages, needs root), start everything; idempotent
#   slurm/cluster.sh down     stop everything (the state directory stays; `clean` removes it)
#   slurm/cluster.sh status   print what runs
#   slurm/cluster.sh env      print `export SLURM_CONF=...` for your shell: eval "$(slurm/cluster.sh env)"
#   slurm/cluster.sh clean    down, then remove the state directory
#   slurm/cluster.sh on N CMD...               run CMD on node N (1, 2, ...; ctl: the controller's host)
#   slurm/cluster.sh preempt-signal user|term  what a preempted job gets first (below); reconfigures
#   slurm/cluster.sh node-down|node-up N       kill every process of node N / start its slurmd again
#   slurm/cluster.sh link-cut|link-up N        take node N's network link down / up (its processes live on)
#
# One node (LAUNCHER_SLURM_NODES=1, the default): every daemon on loopback; `on` runs CMD here.
# Several nodes (LAUNCHER_SLURM_NODES=N, 2 to 9, root): each node is a network namespace with its own address
# (10.214.S.11, .12, ...), hostname and hosts file, running its own slurmd; the control daemons run in one
# more namespace that holds the bridge (10.214.S.1). Clients (sbatch, sacct, launcher submit) reach the
# controller only from the namespaces: run them with `on`. Partitions: `debug` (the default, GraceTime 30 s)
# and `urgent`, whose jobs preempt debug's (PreemptMode=REQUEUE). A preempted job first gets its --signal
# (submitit's USR2) with `preempt-signal user` (SlurmctldParameters=preempt_send_user_signal, the default),
# SIGTERM with `term`. `down` ends every process in the namespaces and deletes them.
#
# Everything (configs, state, logs, pid files, the munge socket, the database) lives under one directory,
# $LAUNCHER_SLURM_DIR (default /tmp/launcher-slurm). Clients find the cluster through SLURM_CONF.
# Ports: $LAUNCHER_SLURM_PORT_BASE (default 16817) + 0 slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB.
# Job ids start at $LAUNCHER_SLURM_FIRST_JOB_ID (default 1 + 1000 x ((port base / 4) mod 10), 4001): two
# clusters on one machine with other port bases also get other job ids, so the rank port each job derives
# from its id (15000 + id mod 10000, launcher/env.py) differs too.
# `up`, `down` and `clean` take the state directory's lock ($DIR/.lock, waiting at most
# $LAUNCHER_SLURM_LOCK_WAIT_S, default 600 s): two of them at once on one directory would start (or stop) one
# daemon twice. A failed `up` stops the daemons it started (those already running stay).
# Exit codes: 0 ok, 1 a daemon did not come up (its log is printed) or the lock was not free in time, 2 bad
# usage, 3 cannot run here (the reason is printed).
set -euo pipefail

DIR=${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm}
BASE=${LAUNCHER_SLURM_PORT_BASE:-16817}
FIRST_JOB_ID=${LAUNCHER_SLURM_FIRST_JOB_ID:-$(( 1 + 1000 * ((BASE / 4) % 10) ))}
CTLD_PORT=$BASE; SLURMD_PORT=$((BASE + 1)); DBD_PORT=$((BASE + 2)); DB_PORT=$((BASE + 3))
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core)
NODES=${LAUNCHER_SLURM_NODES:-1}
export SLURM_CONF=$CONF

say() { echo "[slurm-cluster] $*" >&2; }
cannot() { say "cannot run here: $*"; exit 3; }

[[ $NODES =~ ^[1-9]$ ]] || { say "LAUNCHER_SLURM_NODES=$NODES: give 1 to 9"; exit 2; }
if (( NODES > 1 )); then
  TAG=lsl$((BASE % 10000))  # namespace and host names: lsl6817c (controller), lsl6817n1, lsl6817n2, ...
  SUBNET=10.214.$(( (BASE / 4) % 250 ))
  CTL=${TAG}c CTL_ADDR=$SUBNET.1
else
  CTL=$(hostname -s) CTL_ADDR=127.0.0.1
fi
node_name() { if (( NODES > 1 )); then echo "${TAG}n$1"; else hostname -s; fi; }
node_addr() { if (( NODES > 1 )); then echo "$SUBNET.$((10 + $1))"; else echo 127.0.0.1; fi; }
slurmd_pid() { if (( NODES > 1 )); then echo "$DIR/run/slurmd-$(node_name "$1").pid"; else echo "$DIR/run/slurmd.pid"; fi; }

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

# alive PIDFILE: its process runs and is the one that wrote it, started before the file was. Pids wrap around
# (at 32768 on the CI machines, after a few thousand processes of the suite), and the pid of a daemon that
# died may belong to any process by now: `down` would have killed it (a test's DataLoader worker, say).
alive() {
  local pid fields
  [[ -f $1 ]] && pid=$(cat "$1") && [[ $pid =~ ^[0-9]+$ ]] || return 1
  fields=$(cat "/proc/$pid/stat" 2> /dev/null) || return 1
  read -ra fields <<< "${fields##*) }"  # after the name; field 22 of stat(5), the start in clock ticks
  (( $(awk '/^btime/ {print $2}' /proc/stat) + fields[19] / $(getconf CLK_TCK) <= $(stat -c %Y "$1") + 2 ))
}

# on_host NAME CMD...: CMD in namespace NAME, with its network, the hostname NAME, the cluster's hosts file and
# a /dev/shm of its own (in mount and UTS namespaces of its own: `ip netns exec` remounts /sys, and slurmd then
# finds no cgroup file system; a lost node's semaphores go with it, as on a real machine). The one-node
# cluster runs CMD here.
# With --exec the shell becomes CMD (so `on_host --exec ... &` gives CMD's pid in $!).
on_host() {  # on_host [--exec] NAME CMD...
  local run=()
  if [[ $1 == --exec ]]; then run=(exec); shift; fi
  local name=$1; shift
  # 9>&-: the daemons must not inherit the state directory's lock (lock_dir), or it is held as long as they run.
  if (( NODES == 1 )); then "${run[@]}" "$@" 9>&-; return; fi
  "${run[@]}" nsenter --net="/run/netns/$name" unshare --uts --mount \
    sh -c 'hostname "$0" && mount --bind "$1" /etc/hosts && mount -t tmpfs -o mode=1777 shm /dev/shm &&
           shift && exec "$@"' "$name" "$DIR/etc/hosts" "$@" 9>&-
}

wait_for() {  # wait_for SECONDS LOGFILE WHAT PIDFILE COMMAND...: until COMMAND succeeds
  # A daemon that wrote its pid file and exited (a port in use, a bad config) fails at once, not after SECONDS.
  local seconds=$1 log=$2 what=$3 pidfile=$4 outcome end=$((SECONDS + $1)); shift 4
  while (( SECONDS < end )); do
    "$@" > /dev/null 2>&1 && return 0
    if [[ -f $pidfile ]] && ! alive "$pidfile"; then outcome="exited"; break; fi
    sleep 0.1
  done
  say "$what ${outcome:-did not come up in ${seconds}s}; last lines of $log:"
  tail -20 "$log" >&2 || true
  exit 1
}

# The lock of the state directory, held until this script exits (fd 9). flock(1) is util-linux's.
lock_dir() {
  local wait=${LAUNCHER_SLURM_LOCK_WAIT_S:-600}
  mkdir -p "$DIR"
  exec 9> "$DIR/.lock"
  flock -w "$wait" 9 || { say "$DIR is in use by another cluster.sh (its lock $DIR/.lock was not free in ${wait}s)"; exit 1; }
}

# What this `up` started (pid files, in order) and whether it made the namespaces: undone if it fails.
STARTED=() MADE_NET=0
# starting PIDFILE: a daemon that writes PIDFILE is about to start. A stale file goes (wait_for would take it
# for a daemon that exited), and a failed `up` stops the daemon.
starting() { rm -f "$1"; STARTED+=("$1"); }
undo_failed_up() {
  local rc=$? i
  (( rc == 0 )) && return 0
  if (( ${#STARTED[@]} > 0 || MADE_NET )); then
    say "up failed: stopping what it started (${STARTED[*]##*/})"
    for (( i = ${#STARTED[@]} - 1; i >= 0; i-- )); do stop_pid "${STARTED[i]}"; done
    (( MADE_NET )) && net_down
  fi
  exit "$rc"
}

net_up() {
  (( NODES > 1 )) || return 0
  [[ $(id -u) -eq 0 ]] || cannot "a cluster of $NODES nodes needs root (network namespaces)"
  command -v nsenter > /dev/null && command -v unshare > /dev/null || cannot "nsenter or unshare is missing"
  [[ -e /run/netns/$CTL ]] && return 0
  MADE_NET=1
  ip netns add "$CTL"
  ip -n "$CTL" link set lo up
  ip -n "$CTL" link add br0 type bridge
  ip -n "$CTL" addr add "$CTL_ADDR/24" dev br0
  ip -n "$CTL" link set br0 up
  local i name
  for i in $(seq "$NODES"); do
    name=$(node_name "$i")
    ip netns add "$name"
    ip -n "$CTL" link add "v$i" type veth peer name eth0 netns "$name"
    ip -n "$CTL" link set "v$i" master br0 up
    ip -n "$name" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$name" link set eth0 up
    ip -n "$name" link set lo up
  done
}

kill_namespace() {  # every process in the network namespace
  local pids
  pids=$(ip netns pids "$1" 2> /dev/null || true)
  if [[ -n $pids ]]; then kill -9 $pids 2> /dev/null || true; fi
}

net_down() {
  (( NODES > 1 )) || return 0
  local i name
  for name in $(for i in $(seq "$NODES"); do node_name "$i"; done) "$CTL"; do
    [[ -e /run/netns/$name ]] || continue
    kill_namespace "$name"
    ip netns del "$name" 2> /dev/null || true
  done
}

write_configs() {
  local cpus mem i pid_file spool_dir log_file nodes_conf="" partitions preempt
  cpus=$(nproc)
  mem=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512) / NODES ))
  mkdir -p "$DIR"/{etc,munge,run,log,spool/ctld,db}
  chmod 700 "$DIR/munge"
  for i in $(seq "$NODES"); do
    nodes_conf+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
  done
  if (( NODES > 1 )); then
    # %n (the node's name) keeps the nodes' slurmd apart on the one file system.
    pid_file=$DIR/run/slurmd-%n.pid spool_dir=$DIR/spool/d-%n log_file=$DIR/log/slurmd-%n.log
    { echo "127.0.0.1 localhost"; echo "$CTL_ADDR $CTL"
      for i in $(seq "$NODES"); do echo "$(node_addr "$i") $(node_name "$i")"; done; } > "$DIR/etc/hosts"
    preempt=SlurmctldParameters=preempt_send_user_signal
    if [[ -f $DIR/etc/preempt-signal ]] && [[ $(cat "$DIR/etc/preempt-signal") == term ]]; then
      preempt="# preempt-signal term: SIGTERM first (an empty SlurmctldParameters= does not parse)"
    fi
    # SlurmdTimeout=20: a lost node is DOWN (its jobs NODE_FAIL and are requeued) about 30 s after it went
    # (10 makes no difference: slurmctld looks at node timeouts every 30 s).
    partitions="SlurmdTimeout=20
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$preempt
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF"
  else
    pid_file=$DIR/run/slurmd.pid spool_dir=$DIR/spool/d log_file=$DIR/log/slurmd.log
    partitions="PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  fi
  cat > "$CONF" <<EOF
# Written by slurm/cluster.sh: a test cluster of $NODES node(s) on this machine.
ClusterName=launcher
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=$CTL($CTL_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (SLURM's least): a requeued job may start again after 5 s instead of 120 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$spool_dir
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$pid_file
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$log_file
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
# The controller's address, not loopback: sacct on a node talks to slurmdbd itself.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL_ADDR
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
$nodes_conf$partitions
EOF
  cat > "$DIR/etc/slurmdbd.conf" <<EOF
# Written by slurm/cluster.sh. slurmdbd reads this file beside \$SLURM_CONF (it has no -f option).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$CTL
DbdAddr=$CTL_ADDR
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
  starting "$DIR/munge/munged.pid"
  # The socket is a file: clients in every namespace reach it.
  on_host "$CTL" munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_for 10 "$DIR/log/munged.log" munged "$DIR/munge/munged.pid" munge --socket="$MUNGE_SOCKET" -n
}

start_mariadb() {
  alive "$DIR/run/mariadb.pid" && return 0
  if [[ ! -d $DIR/db/mysql ]]; then
    mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=normal \
      --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1 \
      || { tail -20 "$DIR/log/mariadb-install.log" >&2; exit 1; }
  fi
  starting "$DIR/run/mariadb.pid"
  on_host --exec "$CTL" mariadbd --no-defaults --datadir="$DIR/db" --user=root --bind-address=127.0.0.1 \
    --port="$DB_PORT" --socket="$DIR/run/mariadb.sock" --pid-file="$DIR/run/mariadb.pid" \
    --log-error="$DIR/log/mariadb.log" --skip-name-resolve --innodb-buffer-pool-size=32M > /dev/null 2>&1 &
  # Its pid at once (mariadbd writes the same one later): a MariaDB that hangs before it writes the file is
  # still stopped by a failed `up`, and one that exits (its port taken) fails at once.
  echo $! > "$DIR/run/mariadb.pid"
  # --connect-timeout: something else listening on the port (not answering as MariaDB) would hang the client.
  wait_for 30 "$DIR/log/mariadb.log" MariaDB "$DIR/run/mariadb.pid" \
    on_host "$CTL" mariadb --no-defaults --connect-timeout=2 -h 127.0.0.1 -P "$DB_PORT" -u root -e "select 1"
}

start_slurmd() {  # start_slurmd N
  alive "$(slurmd_pid "$1")" && return 0
  starting "$(slurmd_pid "$1")"
  if (( NODES > 1 )); then on_host "$(node_name "$1")" slurmd -N "$(node_name "$1")"; else slurmd 9>&-; fi
}

nodes_up() {  # every node answers (idle, mixed or allocated)
  local states
  states=$(on_host "$CTL" sinfo -h -N -o %t) || return 1
  [[ $(grep -cE '^(idle|mix|alloc)' <<< "$states") -ge $NODES ]]
}

start_slurm() {
  if ! alive "$DIR/run/slurmdbd.pid"; then
    starting "$DIR/run/slurmdbd.pid"
    on_host "$CTL" slurmdbd
    wait_for 30 "$DIR/log/slurmdbd.log" slurmdbd "$DIR/run/slurmdbd.pid" on_host "$CTL" bash -c "exec 3<>/dev/tcp/$CTL_ADDR/$DBD_PORT"
  fi
  if ! alive "$DIR/run/slurmctld.pid"; then
    starting "$DIR/run/slurmctld.pid"
    on_host "$CTL" slurmctld
    wait_for 30 "$DIR/log/slurmctld.log" slurmctld "$DIR/run/slurmctld.pid" on_host "$CTL" scontrol ping
  fi
  local i
  for i in $(seq "$NODES"); do start_slurmd "$i"; done
  wait_for 30 "$DIR/log/slurmctld.log" "$NODES node(s)" - nodes_up
}

stop_pid() {  # stop_pid PIDFILE
  local pidfile=$1 pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill "$pid" 2> /dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2> /dev/null || true
  rm -f "$pidfile"
}

cluster_down() {
  # Jobs first, so no task outlives the daemons.
  if alive "$DIR/run/slurmctld.pid"; then
    # A cancel, not a signal (--full only signals): slurmd kills what ignores SIGTERM (submitit's tasks do)
    # after KillWait; wait for that, or a task waiting for a peer outlives the daemons.
    on_host "$CTL" scancel --quiet --user "$(id -un)" 2> /dev/null || true
    for _ in $(seq 40); do
      [[ -z $(on_host "$CTL" squeue -h -u "$(id -un)" 2> /dev/null) ]] && break
      sleep 1
    done
  fi
  local i name
  for i in $(seq "$NODES"); do stop_pid "$(slurmd_pid "$i")"; done
  for name in slurmctld slurmdbd mariadb; do stop_pid "$DIR/run/$name.pid"; done
  stop_pid "$DIR/munge/munged.pid"
  net_down
  say "down"
}

node_number() {  # node_number ARG: 1..NODES, or exit 2
  [[ $1 =~ ^[1-9]$ ]] && (( $1 <= NODES )) || { say "no node '$1' (nodes 1 to $NODES, or ctl)"; exit 2; }
}

case ${1:-} in
  up)
    lock_dir
    trap undo_failed_up EXIT
    install_packages
    net_up
    write_configs
    start_munge
    start_mariadb
    start_slurm
    say "up: $(on_host "$CTL" sinfo -h -o '%P %D node(s) %C cpus (alloc/idle/other/total)' | tr '\n' ' ')"
    trap - EXIT
    echo "export SLURM_CONF=$CONF"
    ;;
  down)
    [[ -d $DIR ]] && lock_dir  # nothing to lock (or to leave behind) where no cluster ever was
    cluster_down
    ;;
  status)
    for f in "$DIR"/run/*.pid "$DIR"/munge/munged.pid; do
      [[ -e $f ]] || continue
      if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
    done
    if alive "$DIR/run/slurmctld.pid"; then on_host "$CTL" sinfo; fi
    ;;
  env)
    echo "export SLURM_CONF=$CONF"
    ;;
  on)
    (( $# >= 3 )) || { say "usage: $0 on N|ctl CMD..."; exit 2; }
    if [[ $2 == ctl ]]; then host=$CTL; else node_number "$2"; host=$(node_name "$2"); fi
    shift 2
    on_host "$host" "$@"
    ;;
  preempt-signal)
    [[ ${2:-} == user || ${2:-} == term ]] || { say "usage: $0 preempt-signal user|term"; exit 2; }
    (( NODES > 1 )) || { say "preemption is set up on clusters of several nodes only"; exit 2; }
    echo "$2" > "$DIR/etc/preempt-signal"
    write_configs
    on_host "$CTL" scontrol reconfigure
    ;;
  node-down)
    node_number "${2:-}"
    (( NODES > 1 )) && kill_namespace "$(node_name "$2")"
    rm -f "$(slurmd_pid "$2")"
    ;;
  node-up)
    node_number "${2:-}"
    start_slurmd "$2"
    ;;
  link-cut|link-up)
    node_number "${2:-}"
    (( NODES > 1 )) || { say "$1: clusters of several nodes only"; exit 2; }
    if [[ $1 == link-cut ]]; then state=down; else state=up; fi
    ip -n "$CTL" link set "v$2" "$state"  # the bridge's end of the node's veth pair
    # Back: slurmd registers at once (SIGHUP: it rereads its config and registers). slurmctld would find the
    # node only on a later ping of down nodes, up to a minute later depending on where its cycle was.
    if [[ $state == up ]] && alive "$(slurmd_pid "$2")"; then kill -HUP "$(cat "$(slurmd_pid "$2")")"; fi
    ;;
  clean)
    lock_dir
    # Several nodes: every process of the cluster, its jobs' included, lives in the namespaces, and the state
    # goes anyway: SIGKILL them all (faster than stopping each daemon in turn).
    if (( NODES > 1 )); then net_down; say "down"; else cluster_down; fi
    rm -rf "$DIR"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
