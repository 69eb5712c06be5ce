# shellcheck shell=bash disable=SC2034 # globals here are read by the sourcing scripts
# bench/lib.sh: shared by bench/run and bench/flamegraph (sourced, not run).
#
# Starts the three tiers as separate processes talking TCP (redis-server <-
# im-server rpc <- im-server gateway), an nginx reference server, and tears
# everything down again from an EXIT trap, however the script ends.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
CHAT=bench-room

# Filled in by the start_* functions.
WORK=""           # temp dir: configs, logs, the binary under test, Redis' dir
STARTED_PIDS=()   # everything we started, killed in reverse order on exit
REDIS_PID="" REDIS_PORT=""
RPC_PID="" RPC_ADDR=""
GATEWAY_PID="" HTTP_ADDR=""
# The load generator is one address standing for many clients: the gateway's
# per-client shares (its memory budget's, held work's) would make it one
# client. Environment rather than flags, so that a baseline build that has
# no such options still starts.
export IM_MAX_BUFFERED_BYTES=${IM_MAX_BUFFERED_BYTES:-4294967296}
export IM_MAX_HELD_PER_CLIENT=${IM_MAX_HELD_PER_CLIENT:-1000000}
export IM_MAX_HELD=${IM_MAX_HELD:-1000000}
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

# The axum + redis-rs reference server (bench/peer, a crate of its own).
build_peer() {
    log "cargo build --release (bench/peer)"
    (cd "$BENCH_DIR/peer" && cargo build --release --quiet) || die "building bench/peer failed"
    cp "$BENCH_DIR/peer/target/release/im-peer" "$WORK/im-peer"
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
# spawn_redis NAME BASE_PORT [ARGS...]: sets SPAWNED_PID and SPAWNED_PORT.
spawn_redis() {
    local name=$1 base=$2
    shift 2
    SPAWNED_PORT=$(free_port "$base")
    mkdir -p "$WORK/$name"
    redis-server --bind 127.0.0.1 --port "$SPAWNED_PORT" --save "" --appendonly no \
        --dir "$WORK/$name" --daemonize no --logfile "" "$@" >"$WORK/$name.log" 2>&1 &
    SPAWNED_PID=$!
    STARTED_PIDS+=("$SPAWNED_PID")
    wait_for_port "$SPAWNED_PORT" "$SPAWNED_PID" "redis-server ($name)"
}

start_redis() {
    spawn_redis redis 6479
    REDIS_PID=$SPAWNED_PID REDIS_PORT=$SPAWNED_PORT
    log "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT"
}

# The RPC server and the gateway listen on port 0; the port the kernel picked
# is read from their "... listening on ADDR" line.
# spawn_rpc NAME REDIS_URL [ARGS...] and spawn_gateway NAME RPC_ADDRS [ARGS...]
# set SPAWNED_PID and SPAWNED_ADDR.
spawn_rpc() {
    local name=$1 url=$2
    shift 2
    # Emptied here, not by the child's redirection: that runs after the fork,
    # so wait_for_log could read a restarted server's old address first.
    : >"$WORK/$name.log"
    "${IM_BIN:-$WORK/im-server}" rpc --rpc-listen 127.0.0.1:0 --redis "$url" "$@" 2>>"$WORK/$name.log" &
    SPAWNED_PID=$!
    STARTED_PIDS+=("$SPAWNED_PID")
    SPAWNED_ADDR=$(wait_for_log "$WORK/$name.log" 'rpc listening on ' "$SPAWNED_PID" "im-server rpc ($name)")
}

spawn_gateway() {
    local name=$1 rpc=$2
    shift 2
    : >"$WORK/$name.log"
    "${IM_BIN:-$WORK/im-server}" gateway --http-addr 127.0.0.1:0 --rpc "$rpc" "$@" 2>>"$WORK/$name.log" &
    SPAWNED_PID=$!
    STARTED_PIDS+=("$SPAWNED_PID")
    SPAWNED_ADDR=$(wait_for_log "$WORK/$name.log" 'http listening on ' "$SPAWNED_PID" "im-server gateway ($name)")
}

# Extra flags per tier, for experiments: BENCH_RPC_ARGS="--threads 1" bench/run
# (and BENCH_RPCN_ARGS for the RPC servers of an rpcN stack, see start_variant)
# shellcheck disable=SC2086 # word splitting of the extra flags is wanted
start_rpc() {
    spawn_rpc rpc "redis://127.0.0.1:$REDIS_PORT" ${BENCH_RPC_ARGS:-}
    RPC_PID=$SPAWNED_PID RPC_ADDR=$SPAWNED_ADDR
    log "im-server rpc pid $RPC_PID on $RPC_ADDR"
}

# shellcheck disable=SC2086 # word splitting of the extra flags is wanted
start_gateway() {
    spawn_gateway gateway "$RPC_ADDR" ${BENCH_GATEWAY_ARGS:-}
    GATEWAY_PID=$SPAWNED_PID HTTP_ADDR=$SPAWNED_ADDR
    log "im-server gateway pid $GATEWAY_PID on $HTTP_ADDR"
}

start_stack() {
    start_redis
    start_rpc
    start_gateway
}

# --- stacks: variants of the three tiers, measured side by side by bench/run -------

# start_variant NAME starts one stack and records, under NAME:
#   STACK_URL       the URL wrk is given (the first gateway)
#   STACK_GATEWAYS  every gateway's host:port, comma-separated (wrk threads
#                   spread over them: bench/common.lua, BENCH_GATEWAYS)
#   STACK_TOKEN     a bearer token for every request ("" without auth)
#   STACK_PIDS_gateway/_rpc/_redis  the processes of each tier, space-separated
#   STACK_REDIS_PORTS  the Redis masters' ports (FCALL counts, trimming)
# The variants (each differs from `standalone` in one thing):
#   standalone    redis-server, one RPC server, one gateway
#   cluster       Redis Cluster of 3 masters, no replicas
#   cluster-wait  3 masters with one replica each; sends wait for 1 replica (WAIT)
#   standalone-wait  redis-server with one replica; sends wait for it (WAIT): what
#                 cluster-wait is measured against, as it pays for replication too
#   rpcN          N RPC servers behind the gateway (rpc3: three)
#   gwN           N gateways on one RPC server, wrk's threads spread over them
#   auth          JWT authentication on: every request carries a bearer token
#   baseline      standalone with another build of im-server (bench/run --baseline BIN):
#                 an A/B measured side by side, round by round
#   all           one im-server process with no role (gateway + RPC server) on
#                 redis-server: what `REDIS_URL=... cargo run --release` runs
#   all-baseline  all with the --baseline build
#   peer          the axum + redis-rs reference server (bench/peer) on redis-server
declare -A STACK_URL=() STACK_GATEWAYS=() STACK_TOKEN=() STACK_REDIS_PORTS=() \
    STACK_PIDS_gateway=() STACK_PIDS_rpc=() STACK_PIDS_redis=() \
    STACK_REDIS_URL=() STACK_RPC_ARGS=() STACK_GATEWAY_ARGS=()
STACK_NAMES="all all-baseline peer standalone standalone-wait cluster cluster-wait rpcN gwN auth baseline"

start_variant() {
    local name=$1 redis_url rpc_args=() gateway_args=()
    STACK_TOKEN[$name]=""
    case $name in
        standalone | baseline | rpc[1-9] | gw[1-9] | auth | all | all-baseline | peer)
            spawn_redis "$name-redis" 6479
            STACK_PIDS_redis[$name]=$SPAWNED_PID
            STACK_REDIS_PORTS[$name]=$SPAWNED_PORT
            redis_url="redis://127.0.0.1:$SPAWNED_PORT"
            ;;
        standalone-wait)
            start_replicated "$name"
            redis_url="redis://127.0.0.1:${STACK_REDIS_PORTS[$name]}"
            rpc_args+=(--redis-wait-replicas 1)
            ;;
        cluster) start_cluster "$name" 0; redis_url=$CLUSTER_URL ;;
        cluster-wait)
            start_cluster "$name" 1
            redis_url=$CLUSTER_URL
            rpc_args+=(--redis-wait-replicas 1)
            ;;
        *) die "unknown stack $name (known: $STACK_NAMES)" ;;
    esac
    # shellcheck disable=SC2206 # word splitting of the extra flags is wanted
    [[ $name == rpc[1-9] ]] && rpc_args+=(${BENCH_RPCN_ARGS:-})
    if [[ $name == auth ]]; then
        # HS256 wants >= 32 bytes of key (RFC 7518 §3.2).
        head -c 48 /dev/urandom | base64 -w0 >"$WORK/jwt.secret"
        gateway_args+=(--auth-jwt-secret-file "$WORK/jwt.secret")
        # The scripts send as "a2" (bench/common.lua): the token's subject.
        STACK_TOKEN[$name]=$("$WORK/im-server" token --sub a2 --ttl-s 86400 \
            --auth-jwt-secret-file "$WORK/jwt.secret") || die "im-server token failed"
    fi
    STACK_REDIS_URL[$name]=$redis_url
    STACK_RPC_ARGS[$name]="${rpc_args[*]}"
    STACK_GATEWAY_ARGS[$name]="${gateway_args[*]}"
    start_servers "$name"
}

# start_servers NAME: starts the stack's im-server processes (or the peer) on
# its running Redis, from what start_variant recorded; restart_servers NAME
# stops them and starts new ones (bench/run --restart: a figure is then a
# median over starts, not one placement of connections on shards).
start_servers() {
    local name=$1 redis_url=${STACK_REDIS_URL[$1]} rpcs=1 gateways=1 i
    local -a rpc_args gateway_args
    read -r -a rpc_args <<<"${STACK_RPC_ARGS[$name]}"
    read -r -a gateway_args <<<"${STACK_GATEWAY_ARGS[$name]}"
    # The baseline stacks run the other build; every other stack this one.
    IM_BIN=$WORK/im-server
    [[ $name == baseline || $name == all-baseline ]] && IM_BIN=$WORK/im-server-baseline
    case $name in
        all | all-baseline)
            spawn_all "$name" "$redis_url"
            STACK_PIDS_gateway[$name]=$SPAWNED_PID STACK_PIDS_rpc[$name]=""
            STACK_GATEWAYS[$name]=$SPAWNED_ADDR STACK_URL[$name]="http://$SPAWNED_ADDR"
            log "stack $name: one process $SPAWNED_PID on $SPAWNED_ADDR, redis ${STACK_REDIS_PORTS[$name]}"
            return
            ;;
        peer)
            spawn_peer "$name" "$redis_url"
            STACK_PIDS_gateway[$name]=$SPAWNED_PID STACK_PIDS_rpc[$name]=""
            STACK_GATEWAYS[$name]=$SPAWNED_ADDR STACK_URL[$name]="http://$SPAWNED_ADDR"
            log "stack $name: axum + redis-rs $SPAWNED_PID on $SPAWNED_ADDR, redis ${STACK_REDIS_PORTS[$name]}"
            return
            ;;
    esac
    [[ $name == rpc[1-9] ]] && rpcs=${name#rpc}
    [[ $name == gw[1-9] ]] && gateways=${name#gw}
    local rpc_addrs="" pids=""
    for ((i = 1; i <= rpcs; i++)); do
        spawn_rpc "$name-rpc$i" "$redis_url" "${rpc_args[@]}"
        pids+="$SPAWNED_PID " rpc_addrs+="${rpc_addrs:+,}$SPAWNED_ADDR"
    done
    STACK_PIDS_rpc[$name]=${pids% }
    local gw_addrs="" pids=""
    for ((i = 1; i <= gateways; i++)); do
        spawn_gateway "$name-gateway$i" "$rpc_addrs" "${gateway_args[@]}"
        pids+="$SPAWNED_PID " gw_addrs+="${gw_addrs:+,}$SPAWNED_ADDR"
    done
    STACK_PIDS_gateway[$name]=${pids% }
    STACK_GATEWAYS[$name]=$gw_addrs
    STACK_URL[$name]="http://${gw_addrs%%,*}"
    log "stack $name: gateways $gw_addrs (pids ${STACK_PIDS_gateway[$name]}), rpc $rpc_addrs" \
        "(pids ${STACK_PIDS_rpc[$name]}), redis ${STACK_REDIS_PORTS[$name]} (pids ${STACK_PIDS_redis[$name]})"
}

restart_servers() {
    local name=$1 pid i alive
    local pids="${STACK_PIDS_gateway[$name]} ${STACK_PIDS_rpc[$name]}"
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    start_servers "$name"
}

# spawn_all NAME REDIS_URL: im-server with no role (gateway and RPC server in
# one process), what `REDIS_URL=... cargo run --release` runs.
spawn_all() {
    local name=$1 url=$2
    : >"$WORK/$name.log"
    "$IM_BIN" --http-addr 127.0.0.1:0 --rpc-listen 127.0.0.1:0 --redis "$url" 2>>"$WORK/$name.log" &
    SPAWNED_PID=$!
    STARTED_PIDS+=("$SPAWNED_PID")
    SPAWNED_ADDR=$(wait_for_log "$WORK/$name.log" 'http listening on ' "$SPAWNED_PID" "im-server ($name)")
}

# spawn_peer NAME REDIS_URL: the axum + redis-rs reference (bench/peer).
spawn_peer() {
    local name=$1 url=$2 port
    port=$(free_port 18390)
    "$WORK/im-peer" "127.0.0.1:$port" "$url" 2>"$WORK/$name.log" &
    SPAWNED_PID=$!
    STARTED_PIDS+=("$SPAWNED_PID")
    wait_for_port "$port" "$SPAWNED_PID" "im-peer ($name)"
    SPAWNED_ADDR="127.0.0.1:$port"
}

# start_replicated NAME: a redis-server and one replica of it, ready when the
# master lists the replica as online. Sets STACK_PIDS_redis (both) and
# STACK_REDIS_PORTS (the master) under NAME.
start_replicated() {
    local name=$1 master replica i
    spawn_redis "$name-master" 6479
    master=$SPAWNED_PORT STACK_PIDS_redis[$name]=$SPAWNED_PID
    spawn_redis "$name-replica" $((master + 1)) --replicaof 127.0.0.1 "$master"
    replica=$SPAWNED_PORT STACK_PIDS_redis[$name]+=" $SPAWNED_PID"
    STACK_REDIS_PORTS[$name]=$master
    for ((i = 0; i < 200; i++)); do
        [[ $(redis-cli -p "$master" INFO replication) == *"port=$replica,state=online"* ]] && return 0
        sleep 0.05
    done
    die "the replica on $replica did not come online within 10 s"
}

# start_cluster NAME REPLICAS: a Redis Cluster of 3 masters with REPLICAS
# replicas each, as in ../shared/notes/redis-cluster.md (the cluster bus is
# port + 10000, so ports stay low). Sets CLUSTER_URL (all masters as seeds),
# STACK_PIDS_redis and STACK_REDIS_PORTS (the masters) under NAME.
start_cluster() {
    local name=$1 replicas=$2 nodes=$((3 * (1 + $2))) i ports=() pids="" base=17000
    for ((i = 0; i < nodes; i++)); do
        spawn_redis "$name-node$i" "$base" --cluster-enabled yes \
            --cluster-config-file "$WORK/$name-node$i/nodes.conf" --cluster-node-timeout 1000 \
            --cluster-require-full-coverage no
        ports+=("$SPAWNED_PORT") pids+="$SPAWNED_PID "
        base=$((SPAWNED_PORT + 1))
    done
    local addrs=() port
    for port in "${ports[@]}"; do addrs+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas "$replicas" --cluster-yes \
        >"$WORK/$name-create.log" 2>&1 || die "redis-cli --cluster create failed: $(tail -n 5 "$WORK/$name-create.log")"
    # Ready when every node agrees the cluster is ok and, with replicas,
    # every master's replica is listed in CLUSTER SLOTS.
    for ((i = 0; i < 200; i++)); do
        local ok=1
        for port in "${ports[@]}"; do
            [[ $(redis-cli -p "$port" CLUSTER INFO) == *cluster_state:ok* ]] || ok=0
        done
        if ((ok && replicas > 0)); then
            (($(redis-cli -p "${ports[0]}" CLUSTER SLOTS | grep -c '^127.0.0.1$') >= nodes)) || ok=0
        fi
        ((ok)) && break
        sleep 0.1
    done
    ((ok)) || die "cluster $name did not become ready within 20 s"
    local masters=()
    for port in "${ports[@]}"; do
        [[ $(redis-cli -p "$port" ROLE | head -n 1) == master ]] && masters+=("$port")
    done
    STACK_PIDS_redis[$name]=${pids% }
    STACK_REDIS_PORTS[$name]=${masters[*]}
    CLUSTER_URL="redis://127.0.0.1:${masters[0]}"
    for port in "${masters[@]:1}"; do CLUSTER_URL+=",127.0.0.1:$port"; done
}

# fcall_count NAME: the FCALLs the stack's Redis masters have run, into FCALLS.
fcall_count() {
    local port calls
    FCALLS=0
    for port in ${STACK_REDIS_PORTS[$1]}; do
        calls=$(redis-cli -p "$port" INFO commandstats | sed -n 's/^cmdstat_fcall:calls=\([0-9]*\),.*/\1/p')
        FCALLS=$((FCALLS + ${calls:-0}))
    done
}

# empty_rooms NAME: FLUSHALL on the stack's Redis masters (the function
# library stays: FLUSHALL leaves functions). With --rooms, every round's send
# run then stores into empty rooms, as the first did: without it the rooms
# grew round after round (about 70 messages each per 10 s run over 10,000
# rooms), past the 128 at which Redis turns a listpack into a skiplist, so
# later rounds measured dearer sends and bigger pulls, not another start.
empty_rooms() {
    local port
    for port in ${STACK_REDIS_PORTS[$1]}; do
        if [[ $(redis-cli -p "$port" ROLE | head -n 1) == master ]]; then
            redis-cli -p "$port" FLUSHALL >/dev/null || die "stack $1: FLUSHALL on port $port failed"
        fi
    done
}

# check_stack_alive NAME: fails loudly if a process of the stack has died.
check_stack_alive() {
    local tier pid pids
    for tier in gateway rpc redis; do
        pids="STACK_PIDS_$tier[$1]"
        for pid in ${!pids}; do
            kill -0 "$pid" 2>/dev/null || die "stack $1: a $tier process ($pid) has died"
        done
    done
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

# seed_room N [HOST:PORT [TOKEN]]: stores N messages in $CHAT through the
# API (of $HTTP_ADDR by default; with a bearer TOKEN if given). One curl
# process with N `next`-separated requests reuses one keep-alive connection,
# which takes well under a second for 1,000 messages.
seed_room() {
    local n=$1 addr=${2:-$HTTP_ADDR} token=${3:-} i auth=""
    local url="http://$addr/api/send" config=$WORK/seed.curlrc
    [[ -n $token ]] && auth="header = \"Authorization: Bearer $token\""
    for ((i = 1; i <= n; i++)); do
        printf 'url = "%s"\nrequest = "POST"\nheader = "Content-Type: application/json"\n%s\n' "$url" "$auth"
        printf 'data = "{\\"chat\\":\\"%s\\",\\"text\\":\\"seed message %d\\",\\"sender\\":\\"a2\\"}"\n' "$CHAT" "$i"
        printf 'output = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n'
        ((i < n)) && printf 'next\n'
    done >"$config"
    local ok
    ok=$(curl -sS --config "$config" | grep -c '^200$' || true)
    [[ $ok -eq $n ]] || die "seeding $CHAT on $addr: only $ok of $n sends answered 200"
    # Check the room reads back: a full page and more behind it.
    local page
    page=$(curl -sS -X GET -H 'Content-Type: application/json' ${token:+-H "Authorization: Bearer $token"} \
        --data "{\"chat\":\"$CHAT\",\"cursor\":0,\"limit\":10}" "http://$addr/api/pull")
    [[ $page == *'"has_more":true'* && $page == *'seed message '* ]] ||
        die "pull after seeding returned: $page"
    log "seeded $CHAT on $addr with $n messages"
}

# trim_room [NAME]: keeps only the newest 1,000 messages of $CHAT, so that
# every pull run reads the same room and Redis's memory does not grow run
# over run (a 10 s send run stores about half a million messages). With a
# stack NAME, in that stack's Redis (-c follows a cluster's redirection).
trim_room() {
    local port=$REDIS_PORT
    [[ -n ${1:-} ]] && port=${STACK_REDIS_PORTS[$1]%% *}
    redis-cli -c -p "$port" ZREMRANGEBYRANK "im:{$CHAT}" 0 -1001 >/dev/null
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
