#!/usr/bin/env bash
# Run locust headless against minilb (Gunicorn) and two simulators, for a bounded time.
#
#   scripts/loadtest.sh                      # every scenario, 30 s, 32 users
#   scripts/loadtest.sh -t 60 -u 64 MixUser  # user classes to run, by name
#   scripts/loadtest.sh -T stream            # or locust tags
#
# Writes reports/locust-<stamp>_{stats,failures,exceptions,stats_history}.csv and
# reports/locust-<stamp>.html. Everything it starts is stopped by PID on exit.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/loadtest.sh [-t SECS] [-u USERS] [-r SPAWN_RATE] [-w WORKERS] [-T TAGS]
                           [-i ITL_SECS] [-o REPORT_DIR] [USER_CLASS ...]
  -t  run time in seconds (default 30)        -u  concurrent users (default 32)
  -r  users started per second (default 32)   -w  minilb workers (default 2)
  -T  locust tags, comma-separated            -i  simulator inter-token latency (default 0)
  -o  report directory (default reports)
USER_CLASS: GenerateUser GenerateStreamUser ChatUser ChatStreamUser BatchUser MixUser
EOF
}

run_time=30 users=32 spawn_rate=32 workers=2 tags="" itl=0 report_dir=reports
while getopts "t:u:r:w:T:i:o:h" opt; do
    case "$opt" in
        t) run_time=$OPTARG ;;
        u) users=$OPTARG ;;
        r) spawn_rate=$OPTARG ;;
        w) workers=$OPTARG ;;
        T) tags=$OPTARG ;;
        i) itl=$OPTARG ;;
        o) report_dir=$OPTARG ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
command -v locust >/dev/null || { echo "locust is missing: pip install locust" >&2; exit 1; }

pids=()
logs=$(mktemp -d)
stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$logs"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

free_port() {  # below the ephemeral range, so no outgoing connection can take it meanwhile
    python - <<'EOF'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
while True:
    port = random.randrange(max(1024, low - 12000), low)
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
EOF
}

# wait_for LOGFILE PATTERN PID: until the line shows up, the process dies, or 30 s pass.
wait_for() {
    local log=$1 pattern=$2 pid=$3
    for _ in $(seq 300); do
        grep -q "$pattern" "$log" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { echo "process $pid died; its log:" >&2; cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    echo "timed out waiting for '$pattern' in $log" >&2
    exit 1
}

wait_http() {
    local url=$1 pid=$2
    for _ in $(seq 300); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { echo "process $pid died" >&2; exit 1; }
        sleep 0.1
    done
    echo "timed out waiting for $url" >&2
    exit 1
}

p_port=$(free_port) b_port=$(free_port) d_port=$(free_port) lb_port=$(free_port)

minilb sim --role prefill --host 127.0.0.1 --port "$p_port" --bootstrap-port "$b_port" \
    --itl "$itl" >"$logs/prefill.log" 2>&1 &
pids+=($!)
wait_for "$logs/prefill.log" "minilb-sim ready" "${pids[-1]}"
minilb sim --role decode --host 127.0.0.1 --port "$d_port" --itl "$itl" >"$logs/decode.log" 2>&1 &
pids+=($!)
wait_for "$logs/decode.log" "minilb-sim ready" "${pids[-1]}"

minilb serve --host 127.0.0.1 --port "$lb_port" --workers "$workers" --log-level warning \
    --prefill "http://127.0.0.1:$p_port" "$b_port" --decode "http://127.0.0.1:$d_port" \
    >"$logs/minilb.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$lb_port/health" "${pids[-1]}"
echo "simulators on :$p_port (bootstrap :$b_port) and :$d_port; minilb ($workers workers) on :$lb_port"

mkdir -p "$report_dir"
stamp=$(date +%Y%m%d-%H%M%S)
prefix="$report_dir/locust-$stamp"
locust_args=(-f loadtests/locustfile.py --headless --host "http://127.0.0.1:$lb_port"
    -u "$users" -r "$spawn_rate" --run-time "${run_time}s" --stop-timeout 5
    --csv "$prefix" --html "$prefix.html" --only-summary)
if [[ -n "$tags" ]]; then
    read -ra tag_list <<<"${tags//,/ }"
    locust_args+=(--tags "${tag_list[@]}")  # last: --tags takes every word after it
fi
echo "locust for ${run_time}s with $users users: ${*:-all scenarios}${tags:+ (tags $tags)}"
status=0
timeout $((run_time + 60)) locust "$@" "${locust_args[@]}" || status=$?
echo "reports: $prefix.html ${prefix}_stats.csv"
if grep -q "Traceback\|Error" "$logs/minilb.log"; then
    echo "minilb logged errors:" >&2
    grep -m 20 "Traceback\|Error" "$logs/minilb.log" >&2
fi
exit "$status"
