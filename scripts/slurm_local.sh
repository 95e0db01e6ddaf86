#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the test suite (hydra/launcher=slurm, submitit).
#
#   scripts/slurm_local.sh up             install what is missing, configure, start; returns once a job ran
#   scripts/slurm_local.sh down [--purge] stop the daemons it started; --purge also removes the config,
#                                         the job state and the accounting database (next `up` starts fresh)
#   scripts/slurm_local.sh status         one line per daemon; exit 0 only if the cluster accepts jobs
#
# Needs root and apt-get (Debian 12: slurm-wlm 22.05.8, munge, slurmdbd, mariadb-server). No init
# system is assumed: every daemon is started here and found again through its pid file.
#
# Accounting is slurmdbd over a local MariaDB (unix socket only): submitit learns job states from
# `sacct`, and in 22.05 plain `sacct` reads slurmdbd only (accounting_storage/filetxt is gone;
# jobcomp/filetxt is read by `sacct -c` alone, and only for finished jobs).
#
# Environment: SLURM_LOCAL_TIMEOUT (seconds `up` waits for each stage, default 90),
#              SLURM_LOCAL_PARTITION (default cpu), SLURM_LOCAL_CLUSTER (default local).
set -euo pipefail

PARTITION=${SLURM_LOCAL_PARTITION:-cpu}
CLUSTER=${SLURM_LOCAL_CLUSTER:-local}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}
PACKAGES=(munge slurm-wlm slurmdbd mariadb-server)

CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm            # Debian's; slurmctld/ and slurmd/ below it
APT_LOG=$LOG_DIR/slurm_local-apt.log
DB_NAME=slurm_acct_db
DB_SOCK=/run/mysqld/mysqld.sock
DB_LOG=$LOG_DIR/mariadb.log

# name | pid file | log file, in start order (down walks it backwards)
DAEMONS=(
    "munged|/run/munge/munged.pid|/var/log/munge/munged.log"
    "mariadbd|/run/mysqld/mysqld.pid|$DB_LOG"
    "slurmdbd|/run/slurmdbd.pid|$LOG_DIR/slurmdbd.log"
    "slurmctld|/run/slurmctld.pid|$LOG_DIR/slurmctld.log"
    "slurmd|/run/slurmd.pid|$LOG_DIR/slurmd.log"
)

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: $*" >&2; exit 1; }

daemon_field() {  # daemon_field NAME FIELD(2=pid file, 3=log)
    local d
    for d in "${DAEMONS[@]}"; do
        [[ ${d%%|*} == "$1" ]] && { cut -d'|' -f"$2" <<<"$d"; return; }
    done
}

pid_of() {  # prints the pid of daemon NAME if its pid file names a live process of that name
    local pidfile pid
    pidfile=$(daemon_field "$1" 2)
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc 0-9 <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$1" ]] || return 1
    echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

await() {  # await DAEMON WHAT COMMAND...: until COMMAND succeeds; fail early if DAEMON has exited
    local name=$1 what=$2 start=$SECONDS; shift 2
    until "$@" >/dev/null 2>&1; do
        # 3 s of grace: a daemon writes its pid file only once it has forked
        if ((SECONDS - start >= 3)) && ! running "$name"; then fail_start "$name" "it exited"; fi
        ((SECONDS - start < TIMEOUT)) || fail_start "$name" "$what after ${TIMEOUT}s"
        sleep 0.5
    done
}

fail_start() {  # one line naming the daemon and its log
    die "$1 failed to start${2:+ ($2)}, see $(daemon_field "$1" 3)"
}

# ---------------------------------------------------------------- install

install_packages() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "apt-get not found, cannot install ${missing[*]}"
    mkdir -p "$LOG_DIR"
    say "installing ${missing[*]} (log: $APT_LOG)"
    # --no-install-recommends: 27 packages instead of 88 (no mail, no perl docs); retry after an
    # update because a fresh image's package lists are often missing or stale.
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
    "${apt[@]}" >"$APT_LOG" 2>&1 ||
        { apt-get update -q >>"$APT_LOG" 2>&1 && "${apt[@]}" >>"$APT_LOG" 2>&1; } ||
        die "apt-get install ${missing[*]} failed, see $APT_LOG"
}

# ---------------------------------------------------------------- configuration

write_if_changed() {  # write_if_changed FILE MODE < content; returns 0 if FILE changed
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
    install -m "$2" -o root -g root "$tmp" "$1"
    rm -f "$tmp"
}

STALE=()  # daemons whose config file write_config changed

write_config() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN)
    # 95% of MemTotal: slurmd drains a node whose RealMemory exceeds what it measures
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"

    write_if_changed "$SLURM_CONF" 0644 <<EOF && STALE+=(slurmd slurmctld)
# Written by scripts/slurm_local.sh: a one-node test cluster. Rewritten by every \`up\`.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire (default 120 s) before it may start again
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$(daemon_field slurmctld 2)
SlurmdPidFile=$(daemon_field slurmd 2)
SlurmctldLogFile=$(daemon_field slurmctld 3)
SlurmdLogFile=$(daemon_field slurmd 3)
# no cgroups needed: processes tracked through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
# Debian has no mailer here; slurmctld logs an error for a missing MailProg
MailProg=/bin/true
# CR_CPU: CPUs are the unit (two 1-CPU jobs run at once even with hyperthreads); memory is not consumed
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# schedule at submit time, without the default 3 s batch delay
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,bf_interval=5
# sacct (submitit's job-state source) reads slurmdbd
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
# reject at submit time what the node can never run (e.g. more CPUs than it has) instead of pending forever
EnforcePartLimits=ALL
# short timers so tests are quick; requeue allowed (submitit's preemption/timeout path)
JobRequeue=1
MinJobAge=10
KillWait=5
InactiveLimit=0
Waittime=0
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    # slurmdbd insists on mode 600 and ownership by its SlurmUser
    write_if_changed "$DBD_CONF" 0600 <<EOF && STALE+=(slurmdbd)
# Written by scripts/slurm_local.sh. MariaDB is local and reached through its unix socket only.
AuthType=auth/munge
DbdHost=$host
SlurmUser=root
PidFile=$(daemon_field slurmdbd 2)
LogFile=$(daemon_field slurmdbd 3)
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=$DB_NAME
EOF
    return 0  # the && lists above fail when a file was already current
}

# ---------------------------------------------------------------- daemons

start_munge() {
    running munged && return 0
    # munged refuses to start unless these exist and belong to munge
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
            die "cannot create /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 || fail_start munged
    await munged "no credential round trip" sh -c 'munge -n | unmunge'
}

start_mariadb() {
    if ! running mariadbd; then
        install -d -o mysql -g mysql -m 0755 /run/mysqld
        mkdir -p "$LOG_DIR"
        touch "$DB_LOG" && chown mysql:mysql "$DB_LOG"
        if [[ ! -d /var/lib/mysql/mysql ]]; then  # datadir removed (purge): recreate it
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >>"$DB_LOG" 2>&1 ||
                fail_start mariadbd "mariadb-install-db"
        fi
        # socket only (no port 3306 to collide with), a small buffer pool: the database is tiny
        setsid -f mariadbd --user=mysql --skip-networking --innodb-buffer-pool-size=32M \
            --socket="$DB_SOCK" --pid-file="$(daemon_field mariadbd 2)" --log-error="$DB_LOG" \
            </dev/null >/dev/null 2>&1
    fi
    await mariadbd "no answer to ping" mariadb-admin --socket="$DB_SOCK" ping
    # root reaches the server through unix_socket auth; slurmdbd gets its own user
    mariadb --socket="$DB_SOCK" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON \`$DB_NAME\`.* TO 'slurm'@'localhost';" >>"$DB_LOG" 2>&1 ||
        fail_start mariadbd "cannot create the slurm database user"
}

start_slurmdbd() {
    if ! running slurmdbd; then
        slurmdbd >/dev/null 2>&1 || fail_start slurmdbd
    fi
    await slurmdbd "no answer to sacctmgr" sacctmgr -n -P list cluster
    if [[ -z $(sacctmgr -n -P list cluster format=Cluster where cluster="$CLUSTER") ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail_start slurmdbd "cannot add cluster $CLUSTER"
    fi
}

node_state() { sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | head -1; }

node_ready() {  # idle; a node an earlier run left drained is resumed
    case $(node_state) in
        idle) return 0 ;;
        drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
    esac
    return 1
}

start_slurm() {
    if ! running slurmctld; then
        slurmctld >/dev/null 2>&1 || fail_start slurmctld
    fi
    await slurmctld "no answer to scontrol ping" scontrol ping
    if ! running slurmd; then
        slurmd >/dev/null 2>&1 || fail_start slurmd
    fi
    await slurmd "node not idle (sinfo -R says why)" node_ready
}

check_job() {  # a batch job with a step must run and reach sacct as COMPLETED
    local jid state deadline=$((SECONDS + TIMEOUT))
    jid=$(sbatch --parsable -p "$PARTITION" -t 1 -c 1 -J slurm_local_check --chdir=/tmp -o /dev/null \
        --wrap 'srun true' 2>&1) || die "sbatch failed: $jid"
    while :; do
        state=$(sacct -j "$jid" -X -n -P -o State 2>/dev/null | head -1)
        case $state in
            COMPLETED) return 0 ;;
            FAILED*|CANCELLED*|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL)
                die "test job $jid ended $state, see $(daemon_field slurmd 3)" ;;
        esac
        ((SECONDS < deadline)) || die "test job $jid not COMPLETED in sacct after ${TIMEOUT}s (state '${state:-none}'), see $(daemon_field slurmctld 3)"
        sleep 0.5
    done
}

stop_daemon() {
    local pid i
    pid=$(pid_of "$1") || return 0
    kill -TERM "$pid"
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || { echo "$1 stopped"; return 0; }
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    echo "$1 killed (no exit 30 s after SIGTERM)"
}

# ---------------------------------------------------------------- commands

accepts_jobs() {  # controller answers, accounting answers, the node can take work
    running slurmctld && running slurmd && running slurmdbd || return 1
    scontrol ping >/dev/null 2>&1 || return 1
    sacct -n -X -j 1 -o JobID >/dev/null 2>&1 || return 1
    [[ $(sinfo -h -p "$PARTITION" -o %a 2>/dev/null) == up ]] || return 1
    case $(node_state) in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

cmd_status() {
    local d name pid ok=0
    for d in "${DAEMONS[@]}"; do
        name=${d%%|*}
        if pid=$(pid_of "$name"); then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        elif [[ -e $(daemon_field "$name" 2) && ! -r $(daemon_field "$name" 2) ]]; then
            printf '%-10s unknown (pid file not readable: run as root)\n' "$name"
        else
            printf '%-10s stopped\n' "$name"
        fi
    done
    if accepts_jobs; then
        printf '%-10s accepts jobs (partition %s, node %s %s)\n' cluster "$PARTITION" "$(hostname -s)" "$(node_state)"
    else
        printf '%-10s does not accept jobs\n' cluster
        ok=1
    fi
    return $ok
}

cmd_up() {
    [[ $(id -u) == 0 ]] || die "must run as root (installs packages, starts daemons as root)"
    local t0=$SECONDS d
    install_packages
    write_config
    if ((${#STALE[@]})); then
        # a daemon running on an older config is restarted with the new one
        for d in "${STALE[@]}"; do stop_daemon "$d" >/dev/null; done
        say "configuration written (${STALE[*]})"
    elif accepts_jobs; then
        say "already up (partition $PARTITION on $(hostname -s))"
        return 0
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm
    check_job
    say "up in $((SECONDS - t0)) s: partition $PARTITION, node $(hostname -s), $(sinfo -h -N -o '%c CPUs, %m MB')"
}

cmd_down() {
    [[ $(id -u) == 0 ]] || die "must run as root"
    local purge=0 db="" i
    case ${1:-} in
        "") ;;
        --purge) purge=1 ;;
        *) die "down takes only --purge, not '$1'" ;;
    esac
    # the database can be dropped only while its server runs
    if ((purge)) && running mariadbd &&
        mariadb --socket="$DB_SOCK" -e "DROP DATABASE IF EXISTS \`$DB_NAME\`" >/dev/null 2>&1; then
        db=", the $DB_NAME database"
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]%%|*}"
    done
    if ((purge)); then
        rm -f "$SLURM_CONF" "$DBD_CONF"
        rm -rf "${STATE_DIR:?}/slurmctld/"* "${STATE_DIR:?}/slurmd/"*
        say "purged $SLURM_CONF, $DBD_CONF$db and the job state"
    fi
    say "down"
}

case ${1:-} in
    up) cmd_up ;;
    down) shift; cmd_down "$@" ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down [--purge]|status" >&2; exit 2 ;;
esac
