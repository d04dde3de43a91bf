#!/usr/bin/env bash
# Local TorchServe for terradapt (loopback only, token auth on).
#
#   deploy/torchserve/torchserve.sh start    render the config, start TorchServe, wait until it answers /ping
#   deploy/torchserve/torchserve.sh stop     graceful stop (SIGTERM to the frontend, SIGKILL after a timeout)
#   deploy/torchserve/torchserve.sh status   running / healthy / stopped (exit 1 unless healthy)
#   deploy/torchserve/torchserve.sh env      export lines for clients (URLs, key file, model store)
#
# Everything lives under $TERRADAPT_RUN_DIR (default /tmp/terradapt-services), like deploy/local/services.sh:
#   torchserve/            working directory (TorchServe writes key_file.json here), rendered config.properties
#   torchserve/tmp/        TEMP (where archives are unpacked) and TMPDIR (TorchServe's own pid file)
#   torchserve/model-store default model store ($TERRADAPT_TS_MODEL_STORE overrides it)
#   logs/torchserve.log    stdout+stderr of the launcher; logs/torchserve/ TorchServe's log4j files
#   torchserve.pid         pid of the launcher (a foreground child of this script's `setsid`)
# Ports: TERRADAPT_TS_INFERENCE_PORT (18080), TERRADAPT_TS_MANAGEMENT_PORT (18081), TERRADAPT_TS_METRICS_PORT
# (18082). Python: $TERRADAPT_PYTHON (default <repo>/.venv/bin/python): the workers run in that interpreter.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../.." && pwd)"

RUN_DIR="${TERRADAPT_RUN_DIR:-/tmp/terradapt-services}"
TS_DIR="${RUN_DIR}/torchserve"
TS_TMP="${TS_DIR}/tmp"
LOG_DIR="${RUN_DIR}/logs"
LOG_FILE="${LOG_DIR}/torchserve.log"
PID_FILE="${RUN_DIR}/torchserve.pid"
CONFIG_TEMPLATE="${SCRIPT_DIR}/config.properties"
CONFIG="${TS_DIR}/config.properties"
KEY_FILE="${TS_DIR}/key_file.json"
MODEL_STORE="${TERRADAPT_TS_MODEL_STORE:-${TS_DIR}/model-store}"
BIND_HOST="127.0.0.1"
INFERENCE_PORT="${TERRADAPT_TS_INFERENCE_PORT:-18080}"
MANAGEMENT_PORT="${TERRADAPT_TS_MANAGEMENT_PORT:-18081}"
METRICS_PORT="${TERRADAPT_TS_METRICS_PORT:-18082}"
START_TIMEOUT="${TERRADAPT_START_TIMEOUT:-120}"
STOP_TIMEOUT="${TERRADAPT_STOP_TIMEOUT:-30}"
if [[ -n "${TERRADAPT_PYTHON:-}" ]]; then
  PYTHON="${TERRADAPT_PYTHON}"
elif [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
  PYTHON="${REPO_ROOT}/.venv/bin/python"
else
  PYTHON="$(command -v python3 || true)"
fi

LAUNCHER_MARKER="ts.model_server"            # in the launcher's command line (see launch below)
FRONTEND_MARKER="org.pytorch.serve.ModelServer"  # in the Java frontend's command line

log() { printf '[torchserve] %s\n' "$*" >&2; }
die() { printf '[torchserve] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

check_port() {
  if ! [[ "$2" =~ ^[0-9]+$ ]] || (($2 < 1 || $2 > 65535)); then die "$1=$2 is not a valid TCP port"; fi
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/${BIND_HOST}/$1" 2>/dev/null; }

# Pid of a live process whose command line contains the marker (pids get reused: check what it is).
live_pid() {  # live_pid PIDFILE MARKER
  local pid
  [[ -f "$1" ]] || return 1
  pid=$(head -n 1 "$1")
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
  kill -0 "${pid}" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
  printf '%s' "${pid}"
}

launcher_pid() { live_pid "${PID_FILE}" "${LAUNCHER_MARKER}"; }
frontend_pid() { live_pid "${TS_TMP}/.model_server.pid" "${FRONTEND_MARKER}"; }

# The inference token from key_file.json (TorchServe guards even /ping with it).
inference_key() {
  [[ -s "${KEY_FILE}" ]] || return 1
  "${PYTHON}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' "${KEY_FILE}" \
    2>/dev/null
}

# "Healthy" means the frontend is up and its key file written (models are registered later, by the client).
healthy() {
  local key
  key=$(inference_key) || return 1
  curl --silent --max-time 3 -H "Authorization: Bearer ${key}" "http://${BIND_HOST}:${INFERENCE_PORT}/ping" \
    2>/dev/null | grep -q '"Healthy"'
}

take_lock() {  # its own lock file: services.sh may call this script while holding its .lock
  mkdir -p "${RUN_DIR}" "${LOG_DIR}"
  exec 9>"${RUN_DIR}/.torchserve.lock"
  flock -w 180 9 || die "timed out waiting for ${RUN_DIR}/.torchserve.lock (another start/stop is running?)"
}

render_config() {
  # '|' as sed delimiter: paths contain '/'. Refuse paths that would break the substitution or the regex.
  [[ "${MODEL_STORE}" != *"|"* && "${MODEL_STORE}" != *"&"* ]] || die "model store path may not contain | or &"
  sed -e "s|@INFERENCE_PORT@|${INFERENCE_PORT}|g" -e "s|@MANAGEMENT_PORT@|${MANAGEMENT_PORT}|g" \
      -e "s|@METRICS_PORT@|${METRICS_PORT}|g" -e "s|@MODEL_STORE@|${MODEL_STORE}|g" \
      "${CONFIG_TEMPLATE}" >"${CONFIG}.tmp"
  printf '# Rendered by deploy/torchserve/torchserve.sh from %s; edits are overwritten.\n' "${CONFIG_TEMPLATE}" \
    | cat - "${CONFIG}.tmp" >"${CONFIG}"
  rm -f "${CONFIG}.tmp"
}

cmd_start() {
  take_lock
  local pid
  if pid=$(launcher_pid); then
    if healthy; then log "already running and healthy (pid ${pid})"; return 0; fi
    log "running (pid ${pid}) but not healthy yet, waiting ..."
    wait_healthy "${pid}" "$(now)"
    return 0
  fi
  rm -f "${PID_FILE}"
  [[ -x "${PYTHON}" ]] || die "no Python interpreter at '${PYTHON}' (set TERRADAPT_PYTHON or create .venv)"
  "${PYTHON}" -c 'import ts, yaml' 2>/dev/null \
    || die "${PYTHON} cannot import ts and yaml: pip install torchserve==0.12.0 pyyaml (make install)"
  command -v java >/dev/null 2>&1 || die "java not found: install a Java 17 runtime"
  local p
  for p in "${INFERENCE_PORT}" "${MANAGEMENT_PORT}" "${METRICS_PORT}"; do
    port_open "${p}" && die "port ${BIND_HOST}:${p} is in use by another process; set TERRADAPT_TS_*_PORT"
  done
  mkdir -p "${TS_DIR}" "${TS_TMP}" "${MODEL_STORE}" "${LOG_DIR}/torchserve"
  MODEL_STORE="$(cd "${MODEL_STORE}" && pwd)"
  render_config
  rm -f "${KEY_FILE}" "${TS_TMP}/.model_server.pid"  # a stale key file would pass the health check
  [[ -f "${LOG_FILE}" ]] && mv -f "${LOG_FILE}" "${LOG_FILE}.1"
  : >"${LOG_FILE}"
  local t0
  t0=$(now)
  # setsid: own process group, so `stop` can always reach the frontend and its workers; cwd = TS_DIR is where
  # TorchServe writes key_file.json. 9>&-: the server must not inherit (and hold) our lock.
  (
    cd "${TS_DIR}"
    exec setsid env TEMP="${TS_TMP}" TMPDIR="${TS_TMP}" LOG_LOCATION="${LOG_DIR}/torchserve" \
      METRICS_LOCATION="${LOG_DIR}/torchserve" \
      "${PYTHON}" -c 'import sys; from ts.model_server import start; sys.argv[0] = "torchserve"; start()' \
      --start --foreground --ncs --ts-config "${CONFIG}" --model-store "${MODEL_STORE}"
  ) >>"${LOG_FILE}" 2>&1 </dev/null 9>&- &
  pid=$!
  printf '%s\n' "${pid}" >"${PID_FILE}"
  log "started pid ${pid} (inference ${INFERENCE_PORT}, management ${MANAGEMENT_PORT}, metrics ${METRICS_PORT}), waiting ..."
  wait_healthy "${pid}" "${t0}"
}

wait_healthy() {  # wait_healthy PID START_TS
  local deadline=$(($(date +%s) + START_TIMEOUT))
  while ! healthy; do
    if ! kill -0 "$1" 2>/dev/null; then
      log "exited during start-up; last lines of ${LOG_FILE}:"
      tail -n 25 "${LOG_FILE}" >&2 || true
      rm -f "${PID_FILE}"
      die "TorchServe failed to start"
    fi
    if (($(date +%s) >= deadline)); then
      tail -n 25 "${LOG_FILE}" >&2 || true
      die "TorchServe (pid $1) not healthy after ${START_TIMEOUT}s; left running: see ${LOG_FILE} or run stop"
    fi
    sleep 0.2
  done
  log "healthy (pid $1) in $(elapsed "$2")s; key file ${KEY_FILE}"
}

cmd_stop() {
  take_lock
  local pid fpid t0 deadline
  if ! pid=$(launcher_pid); then
    rm -f "${PID_FILE}"
    log "not running"
    return 0
  fi
  t0=$(now)
  # The frontend shuts its workers down on SIGTERM; the foreground launcher then exits with it.
  if fpid=$(frontend_pid); then kill -TERM "${fpid}" 2>/dev/null || true; else kill -TERM "${pid}" 2>/dev/null || true; fi
  deadline=$(($(date +%s) + STOP_TIMEOUT))
  while kill -0 "${pid}" 2>/dev/null; do
    if (($(date +%s) >= deadline)); then
      log "still alive after ${STOP_TIMEOUT}s, sending SIGKILL to process group ${pid}"
      kill -KILL -- "-${pid}" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
  done
  # Workers left behind by a killed frontend are in the same process group.
  kill -KILL -- "-${pid}" 2>/dev/null || true
  rm -f "${PID_FILE}" "${KEY_FILE}" "${TS_TMP}/.model_server.pid"
  log "stopped (pid ${pid}) in $(elapsed "${t0}")s"
}

cmd_status() {
  local pid
  if pid=$(launcher_pid); then
    if healthy; then
      printf 'torchserve  healthy                pid %-8s ports %s %s %s\n' "${pid}" "${INFERENCE_PORT}" \
        "${MANAGEMENT_PORT}" "${METRICS_PORT}"
      return 0
    fi
    printf 'torchserve  running, NOT healthy   pid %s\n' "${pid}"
    return 1
  fi
  printf 'torchserve  stopped\n'
  return 1
}

cmd_env() {
  printf 'export TERRADAPT_TORCHSERVE__INFERENCE_URL=http://%s:%s\n' "${BIND_HOST}" "${INFERENCE_PORT}"
  printf 'export TERRADAPT_TORCHSERVE__MANAGEMENT_URL=http://%s:%s\n' "${BIND_HOST}" "${MANAGEMENT_PORT}"
  printf 'export TERRADAPT_TORCHSERVE__METRICS_URL=http://%s:%s\n' "${BIND_HOST}" "${METRICS_PORT}"
  printf 'export TERRADAPT_TORCHSERVE__KEY_FILE=%s\n' "${KEY_FILE}"
  printf 'export TERRADAPT_TS_MODEL_STORE=%s\n' "${MODEL_STORE}"
  printf 'export TERRADAPT_TORCHSERVE__MODEL_STORE=%s\n' "${MODEL_STORE}"
}

main() {
  local cmd=${1:-}
  [[ -n "${cmd}" ]] || { usage >&2; exit 2; }
  check_port TERRADAPT_TS_INFERENCE_PORT "${INFERENCE_PORT}"
  check_port TERRADAPT_TS_MANAGEMENT_PORT "${MANAGEMENT_PORT}"
  check_port TERRADAPT_TS_METRICS_PORT "${METRICS_PORT}"
  case ${cmd} in
    start | up) cmd_start ;;
    stop | down) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *) usage >&2; die "unknown command '${cmd}'" ;;
  esac
}

main "$@"
