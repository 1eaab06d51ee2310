# Sourced by the serving benchmarks, which run one server at a time: its pid in SERVER_PID,
# its address in URL (set URL before calling). The server is stopped when the script exits.
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill -TERM "$SERVER_PID" 2>/dev/null; wait' EXIT

wait_healthy() {  # $1: seconds to wait for $URL/health (Tandem and vLLM both serve it)
    for _ in $(seq 1 "$1"); do
        curl -sf "$URL/health" >/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited" >&2; return 1; }
        sleep 1
    done
    echo "server not healthy" >&2
    return 1
}

stop_server() {
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=""
}
