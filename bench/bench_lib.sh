# bench_lib.sh - shell helpers sourced by bench/bench_*.sh: machine name, the results file,
# load average, and starting/stopping servers on free ports. Not a script of its own.
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${THREADS:-$(nproc)}
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

cpu_model() { lscpu | sed -n 's/^Model name: *//p' | head -1; }
cpu_cores() { nproc; }
machine_slug() { echo "$(cpu_model)-$(cpu_cores)c" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//'; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
RESULTS=${RESULTS:-bench/results/$(date +%Y-%m-%d)-$(machine_slug).md}

# Start the results file with a header the first time a suite writes to it today.
results_init() {
    mkdir -p "$(dirname "$RESULTS")"
    if [ ! -s "$RESULTS" ]; then
        {
            echo "# hydrad benchmarks, $(date +%Y-%m-%d), $(cpu_model), $(cpu_cores) cores"
            echo
            echo "Kernel $(uname -r); hydrad commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
            echo "Every figure is a ratio to a peer or a limit measured in the same run (DESIGN.md section 7)."
            echo "The machine is shared: load averages (1, 5, 15 min) are printed next to the figures."
        } >"$RESULTS"
    fi
}

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_http URL PID: until URL answers 200 or PID dies (60 s).
wait_http() {
    for _ in $(seq 600); do
        kill -0 "$2" 2>/dev/null || return 1
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    return 1
}

# stop_pid PID: SIGTERM, then SIGKILL after 20 s; only the process this script started.
stop_pid() {
    [ -n "${1:-}" ] || return 0
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 200); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
}

# peer_build: the line bench/build_llamacpp.sh left next to the llama.cpp binaries in $LLAMA_BIN
# (native or portable build, its instruction sets, the smoke run); prints nothing when llama.cpp
# was not run. Every results block that has llama.cpp figures prints it.
peer_build() {
    [ -n "${LLAMA_BIN:-}" ] || return 0
    echo "llama.cpp build: $(cat "$LLAMA_BIN/build-info.txt" 2>/dev/null || echo "unknown (no $LLAMA_BIN/build-info.txt)")"
}

# median of numbers on stdin
median() { $PY -c 'import sys,statistics; v=[float(x) for x in sys.stdin.read().split()]; print("%.2f" % statistics.median(v) if v else "nan")'; }
# ratio A B with 2 decimals
ratio() { $PY -c "import sys; a,b=float('$1'),float('$2'); print('%.2f' % (a/b) if b > 0 else 'nan')"; }
# jget FILE KEY: a number from a result JSON
jget() { $PY -c "import json,sys; v=json.load(open('$1')).get('$2'); print('%.2f' % v if isinstance(v,(int,float)) else v)"; }
