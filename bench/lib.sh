# shellcheck shell=bash disable=SC2034 # globals here are read by the sourcing scripts
# bench/lib.sh: shared by bench/run and bench/flamegraph (sourced, not run).
#
# Starts the three tiers as separate processes talking TCP (redis-server <-
# im-server rpc <- im-server gateway), an nginx reference server, and tears
# everything down again from an EXIT trap, however the script ends.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
CHAT=bench:room

# Filled in by the start_* functions.
WORK=""           # temp dir: configs, logs, the binary under test, Redis' dir
STARTED_PIDS=()   # everything we started, killed in reverse order on exit
REDIS_PID="" REDIS_PORT=""
RPC_PID="" RPC_ADDR=""
GATEWAY_PID="" HTTP_ADDR=""
# Set by run_wrk, read by the scripts that source this file.
WRK_RC=0 WRK_TICKS=0 WRK_HWM_KB=0

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    printf 'bench: FAIL: %s\n' "$*" >&2
    exit 1
}

# --- tools -------------------------------------------------------------------

# need_tools CMD:PACKAGE ...: installs the packages of missing commands with
# apt-get when root; otherwise prints the command to run and fails.
need_tools() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    ((${#missing[@]} == 0)) && return 0
    local cmd="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        die "missing packages: ${missing[*]}; as root run: $cmd"
    fi
    log "installing ${missing[*]}"
    bash -c "$cmd" >&2 || die "could not install ${missing[*]}"
}

# Redis >= 7 is what the RPC server's store is written against.
check_redis_version() {
    local version
    version=$(redis-server --version | sed -n 's/.* v=\([0-9][0-9]*\)\..*/\1/p')
    [[ -n $version && $version -ge 7 ]] || die "redis-server >= 7 needed, found: $(redis-server --version)"
}

# Builds the release binary and copies it into $WORK, so the other engineer's
# rebuilds of target/ during a run cannot swap the binary under us.
build_server() {
    log "cargo build --release"
    (cd "$REPO_DIR" && cargo build --release --quiet) || die "cargo build --release failed"
    cp "$REPO_DIR/target/release/im-server" "$WORK/im-server"
}

# --- process bookkeeping -------------------------------------------------------

make_workdir() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/im-bench.XXXXXX")
}

# Kills what we started (newest first): SIGTERM, then SIGKILL after 5 s.
# Installed as the EXIT trap; INT/TERM just exit, which runs it.
cleanup() {
    local rc=$? pid i
    trap - EXIT INT TERM
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${STARTED_PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        local alive=0
        for pid in "${STARTED_PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${STARTED_PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $rc -ne 0 ]]; then
            show_logs
        fi
        if [[ ${BENCH_KEEP:-0} == 1 ]]; then
            log "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

install_traps() {
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "terminated"; exit 143' TERM
}

show_logs() {
    local f
    for f in "$WORK"/*.log; do
        [[ -s $f ]] || continue
        printf -- '--- last lines of %s ---\n' "$(basename "$f")" >&2
        tail -n 15 "$f" >&2
    done
}

# Fails loudly if one of the tiers has died (a crash under load is a finding).
check_alive() {
    local name pid
    for name in redis rpc gateway; do
        case $name in
            redis) pid=$REDIS_PID ;;
            rpc) pid=$RPC_PID ;;
            gateway) pid=$GATEWAY_PID ;;
        esac
        [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || die "the $name process ($pid) has died"
    done
}

# --- ports and readiness ---------------------------------------------------------

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port BASE: the first port from BASE up that nothing listens on.
free_port() {
    local port=$1
    while port_open "$port"; do
        port=$((port + 1))
    done
    echo "$port"
}

# wait_for_log FILE REGEX PID WHAT: waits (10 s at most) for a line matching
# REGEX in FILE and prints its last word (the address the role listens on).
wait_for_log() {
    local file=$1 regex=$2 pid=$3 what=$4 i line
    for ((i = 0; i < 200; i++)); do
        line=$(grep -m1 -E "$regex" "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then
            echo "${line##* }"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$what exited during start-up: $(tail -n 5 "$file")"
        sleep 0.05
    done
    die "$what did not get ready within 10 s"
}

wait_for_port() {
    local port=$1 pid=$2 what=$3 i
    for ((i = 0; i < 200; i++)); do
        port_open "$port" && return 0
        kill -0 "$pid" 2>/dev/null || die "$what exited during start-up"
        sleep 0.05
    done
    die "$what did not listen on $port within 10 s"
}

# --- the servers ---------------------------------------------------------------------

# A private Redis: no RDB snapshots, no AOF, its own port and directory.
start_redis() {
    REDIS_PORT=$(free_port 6479)
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$WORK" --daemonize no --logfile "" >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    STARTED_PIDS+=("$REDIS_PID")
    wait_for_port "$REDIS_PORT" "$REDIS_PID" redis-server
    log "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT"
}

# The RPC server and the gateway listen on port 0; the port the kernel picked
# is read from their "... listening on ADDR" line.
# Extra flags per tier, for experiments: BENCH_RPC_ARGS="--threads 1" bench/run
# shellcheck disable=SC2086 # word splitting of the extra flags is wanted
start_rpc() {
    "$WORK/im-server" rpc --rpc-listen 127.0.0.1:0 \
        --redis "redis://127.0.0.1:$REDIS_PORT" ${BENCH_RPC_ARGS:-} 2>"$WORK/rpc.log" &
    RPC_PID=$!
    STARTED_PIDS+=("$RPC_PID")
    RPC_ADDR=$(wait_for_log "$WORK/rpc.log" 'rpc listening on ' "$RPC_PID" "im-server rpc")
    log "im-server rpc pid $RPC_PID on $RPC_ADDR"
}

# shellcheck disable=SC2086 # word splitting of the extra flags is wanted
start_gateway() {
    "$WORK/im-server" gateway --http-addr 127.0.0.1:0 --rpc "$RPC_ADDR" \
        ${BENCH_GATEWAY_ARGS:-} 2>"$WORK/gateway.log" &
    GATEWAY_PID=$!
    STARTED_PIDS+=("$GATEWAY_PID")
    HTTP_ADDR=$(wait_for_log "$WORK/gateway.log" 'http listening on ' "$GATEWAY_PID" "im-server gateway")
    log "im-server gateway pid $GATEWAY_PID on $HTTP_ADDR"
}

start_stack() {
    start_redis
    start_rpc
    start_gateway
}

# The reference ceilings: nginx answering an empty 200 to every request, with
# a config, pid file, logs and temp paths all inside $WORK (-p/-c/-e), so the
# system's nginx setup is never read or touched. Two of them:
#   nginx   one worker per core (`worker_processes auto`): this machine's HTTP
#           ceiling, using every core as our processes do;
#   nginx1  one worker: the reference earlier results were stated against. It
#           saturates one core while our processes use both, so it understates
#           the ceiling (measured: 133k vs 178k empty 200s/s).
# start_nginx NAME WORKERS BASE_PORT sets NGINX_PORT[NAME] and
# NGINX_WORKER_PIDS[NAME] (space-separated).
declare -A NGINX_PORT=() NGINX_WORKER_PIDS=()
start_nginx() {
    local name=$1 workers=$2 port dir
    port=$(free_port "$3")
    dir=$WORK/$name
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
pid $dir/nginx.pid;
error_log $WORK/$name.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    # nginx closes a keep-alive connection after 1000 requests by default;
    # im-server never does, and wrk would count the reconnects as errors.
    keepalive_requests 100000000;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    server {
        listen 127.0.0.1:$port;
        location / { return 200 ""; }
    }
}
EOF
    nginx -p "$dir/" -c "$dir/nginx.conf" -e "$WORK/$name.log" \
        -g 'daemon off;' >"$WORK/$name-stderr.log" 2>&1 &
    local pid=$!
    STARTED_PIDS+=("$pid")
    wait_for_port "$port" "$pid" "$name"
    # The master opens the socket before it forks the workers: wait for them.
    local want=$workers i pids=""
    [[ $want == auto ]] && want=$(nproc)
    for ((i = 0; i < 100; i++)); do
        pids=$(pgrep -P "$pid" | tr '\n' ' ' || true)
        (($(wc -w <<<"$pids") >= want)) && break
        sleep 0.05
    done
    NGINX_PORT[$name]=$port
    NGINX_WORKER_PIDS[$name]=${pids% }
    log "$name pid $pid (workers ${pids:-?}) on 127.0.0.1:$port"
}

start_nginxes() {
    start_nginx nginx auto 18180
    start_nginx nginx1 1 18280
}

# --- load ---------------------------------------------------------------------------

# seed_room N: stores N messages in $CHAT through the API. One curl process
# with N `next`-separated requests reuses one keep-alive connection, which
# takes well under a second for 1,000 messages.
seed_room() {
    local n=$1 i url="http://$HTTP_ADDR/api/send"
    local config=$WORK/seed.curlrc
    for ((i = 1; i <= n; i++)); do
        printf 'url = "%s"\nrequest = "POST"\nheader = "Content-Type: application/json"\n' "$url"
        printf 'data = "{\\"chat\\":\\"%s\\",\\"text\\":\\"seed message %d\\",\\"sender\\":\\"a2\\"}"\n' "$CHAT" "$i"
        printf 'output = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n'
        ((i < n)) && printf 'next\n'
    done >"$config"
    local ok
    ok=$(curl -sS --config "$config" | grep -c '^200$' || true)
    [[ $ok -eq $n ]] || die "seeding $CHAT: only $ok of $n sends answered 200"
    # Check the room reads back: a full page and more behind it.
    local page
    page=$(curl -sS -X GET -H 'Content-Type: application/json' \
        --data "{\"chat\":\"$CHAT\",\"cursor\":0,\"limit\":10}" "http://$HTTP_ADDR/api/pull")
    [[ $page == *'"has_more":true'* && $page == *'seed message '* ]] ||
        die "pull after seeding returned: $page"
    log "seeded $CHAT with $n messages"
}

# trim_room: keeps only the newest 1,000 messages of $CHAT, so that every
# pull run reads the same room and Redis's memory does not grow run over run
# (a 10 s send run stores about half a million messages).
trim_room() {
    redis-cli -p "$REDIS_PORT" ZREMRANGEBYRANK "im:{$CHAT}" 0 -1001 >/dev/null
}

# --- /proc readers (builtins only: no forks, so they add nothing to the
# --- children CPU times being measured) -------------------------------------------

# cpu_ticks PID: utime + stime of the whole process (all threads), in clock
# ticks, into the global TICKS (0 if the process is gone).
cpu_ticks() {
    TICKS=0
    local stat
    read -r stat <"/proc/$1/stat" 2>/dev/null || return 0
    stat=${stat##*) } # the command name may contain spaces: skip past it
    local -a f
    read -r -a f <<<"$stat"
    # After the name: f[0] is field 3 (state), so utime (14) is f[11], stime f[12].
    TICKS=$((f[11] + f[12]))
}

# group_ticks "PID PID...": cpu_ticks summed over several processes.
group_ticks() {
    local total=0 pid
    for pid in $1; do
        cpu_ticks "$pid"
        total=$((total + TICKS))
    done
    TICKS=$total
}

# children_ticks: CPU ticks of this (sub)shell's reaped children (cutime + cstime).
children_ticks() {
    TICKS=0
    local stat
    read -r stat <"/proc/$BASHPID/stat"
    stat=${stat##*) }
    local -a f
    read -r -a f <<<"$stat"
    # cutime is field 16 (f[13]), cstime field 17 (f[14]).
    TICKS=$((f[13] + f[14]))
}

# busy_ticks: user + system CPU ticks of the whole machine (all cores) from
# /proc/stat into TICKS; used to see how much CPU processes other than the
# measured ones took during a run (a busy machine skews the numbers). irq and
# softirq time is left out: loopback TCP's softirq work is our own traffic.
busy_ticks() {
    local _label user nice system _
    read -r _label user nice system _ </proc/stat
    TICKS=$((user + nice + system))
}

# status_kb PID FIELD: a "kB" value from /proc/PID/status (VmRSS, VmHWM) into
# the global KB (0 if the process is gone).
status_kb() {
    KB=0
    local key value _
    while read -r key value _; do
        if [[ $key == "$2:" ]]; then
            KB=$value
            return 0
        fi
    done <"/proc/$1/status" 2>/dev/null || true
}

# run_wrk OUT ARGS...: runs wrk in the background and waits for it, sampling
# its peak RSS. Sets WRK_RC, WRK_TICKS (its CPU, from this shell's children
# times) and WRK_HWM_KB. Its stdout (with the RESULT line) goes to OUT.
# The polling `sleep`s are children too and add ~1 ms of CPU each to
# WRK_TICKS (< 0.5% of what wrk uses). Sleeping with `read -t` instead would
# avoid that, but bash crashes (longjmp) when an INT trap exits during it.
run_wrk() {
    local out=$1
    shift
    children_ticks
    local before=$TICKS
    wrk "$@" >"$out" 2>&1 &
    local pid=$!
    STARTED_PIDS+=("$pid") # so an interrupted run stops it too
    WRK_HWM_KB=0
    while kill -0 "$pid" 2>/dev/null; do
        status_kb "$pid" VmHWM
        ((KB > WRK_HWM_KB)) && WRK_HWM_KB=$KB
        sleep 0.5
    done
    WRK_RC=0
    wait "$pid" || WRK_RC=$?
    children_ticks
    WRK_TICKS=$((TICKS - before))
}
