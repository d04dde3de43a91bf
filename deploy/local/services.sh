#!/usr/bin/env bash
# Local (Docker-free) Kafka, MinIO and Prometheus for terradapt development and CI.
#
#   deploy/local/services.sh install [kafka|minio|prometheus|k8s-tools|all]   resolve/build/cache (idempotent)
#   deploy/local/services.sh up   [kafka] [minio] [prometheus]      start (default: kafka minio)
#   deploy/local/services.sh down [kafka] [minio] [prometheus]      stop  (default: all)
#   deploy/local/services.sh status                                  state of every service
#   deploy/local/services.sh env                                     export lines for clients
#
# Everything listens on 127.0.0.1 only. Data, logs and pid files live under
# $TERRADAPT_RUN_DIR (default /tmp/terradapt-services); downloaded/built artefacts
# under $TERRADAPT_CACHE (default ~/.cache/terradapt). TERRADAPT_KAFKA_SECURE=1: Kafka's
# client listener is SASL_SSL (SCRAM-SHA-512); TERRADAPT_MINIO_TLS=1: MinIO serves https.
# See deploy/local/README.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---------------------------------------------------------------- settings
CACHE_DIR="${TERRADAPT_CACHE:-${HOME}/.cache/terradapt}"
RUN_DIR="${TERRADAPT_RUN_DIR:-/tmp/terradapt-services}"
LOG_DIR="${RUN_DIR}/logs"
BIND_HOST="127.0.0.1"

KAFKA_VERSION="${TERRADAPT_KAFKA_VERSION:-4.1.1}"
KAFKA_PORT="${TERRADAPT_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${TERRADAPT_KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_HEAP_OPTS="${TERRADAPT_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_HOME="${CACHE_DIR}/kafka-${KAFKA_VERSION}"
KAFKA_LIBS="${KAFKA_HOME}/libs"
MAVEN_REPO="${TERRADAPT_MAVEN_REPO:-${CACHE_DIR}/m2}"
# TERRADAPT_KAFKA_SECURE=1: the client listener is SASL_SSL with SCRAM-SHA-512 (certificates and a SCRAM
# user made for this run dir at the first start); the storage remembers the mode it was formatted with.
KAFKA_SECURE="${TERRADAPT_KAFKA_SECURE:-0}"
KAFKA_TLS_DIR="${RUN_DIR}/kafka/tls"
KAFKA_CLIENT_ENV="${RUN_DIR}/kafka.env"
KAFKA_PASSWORD_FILE="${RUN_DIR}/kafka.password"
KAFKA_SASL_MECHANISM=SCRAM-SHA-512

# MinIO community edition ships as source only: pin a commit (pseudo-version).
MINIO_VERSION="${TERRADAPT_MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
MINIO_PORT="${TERRADAPT_MINIO_PORT:-19000}"
MINIO_CONSOLE_PORT="${TERRADAPT_MINIO_CONSOLE_PORT:-19001}"
GO_PATH_DIR="${CACHE_DIR}/go"
MINIO_BIN="${GO_PATH_DIR}/bin/minio"
MINIO_ENV_FILE="${RUN_DIR}/minio.env"
MINIO_TLS="${TERRADAPT_MINIO_TLS:-0}"   # 1: https with a certificate made for this run dir
MINIO_TLS_DIR="${RUN_DIR}/minio/tls"

# kustomize and kubeconform for tests/deploy/test_k8s.py (deploy/k8s/), built with go install into the same GOPATH
# as MinIO. Versions whose go.mod this machine's Go (1.26) accepts without another toolchain.
KUSTOMIZE_VERSION="${TERRADAPT_KUSTOMIZE_VERSION:-v5.8.2}"
KUBECONFORM_VERSION="${TERRADAPT_KUBECONFORM_VERSION:-v0.8.0}"

PROMETHEUS_PORT="${TERRADAPT_PROMETHEUS_PORT:-19090}"
PROMETHEUS_CONFIG="${TERRADAPT_PROMETHEUS_CONFIG:-}"

START_TIMEOUT="${TERRADAPT_START_TIMEOUT:-120}"   # seconds to wait for health after start
STOP_TIMEOUT="${TERRADAPT_STOP_TIMEOUT:-30}"      # seconds before SIGKILL

ALL_SERVICES=(kafka minio prometheus)
DEFAULT_UP=(kafka minio)

# ---------------------------------------------------------------- helpers
log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

usage() {
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

check_port_var() {
  local name=$1 value=$2
  if ! [[ "${value}" =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
    die "${name}=${value} is not a valid TCP port"
  fi
}

validate_settings() {
  check_port_var TERRADAPT_KAFKA_PORT "${KAFKA_PORT}"
  check_port_var TERRADAPT_KAFKA_CONTROLLER_PORT "${KAFKA_CONTROLLER_PORT}"
  check_port_var TERRADAPT_MINIO_PORT "${MINIO_PORT}"
  check_port_var TERRADAPT_MINIO_CONSOLE_PORT "${MINIO_CONSOLE_PORT}"
  check_port_var TERRADAPT_PROMETHEUS_PORT "${PROMETHEUS_PORT}"
  [[ "${KAFKA_SECURE}" == 0 || "${KAFKA_SECURE}" == 1 ]] || die "TERRADAPT_KAFKA_SECURE=${KAFKA_SECURE}; accepted: 0 or 1"
  [[ "${MINIO_TLS}" == 0 || "${MINIO_TLS}" == 1 ]] || die "TERRADAPT_MINIO_TLS=${MINIO_TLS}; accepted: 0 or 1"
}

require_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH: $2"
}

ensure_run_dir() {
  mkdir -p "${RUN_DIR}" "${LOG_DIR}"
}

# Serialise concurrent invocations (two `up`s racing would start two brokers).
take_lock() {
  ensure_run_dir
  exec 9>"${RUN_DIR}/.lock"
  flock -w 180 9 || die "timed out after 180s waiting for ${RUN_DIR}/.lock (another services.sh up/down is running?)"
}

port_open() {  # port_open PORT -> 0 if something accepts TCP on 127.0.0.1:PORT
  timeout 2 bash -c "exec 3<>/dev/tcp/${BIND_HOST}/$1" 2>/dev/null
}

http_ok() {  # http_ok URL -> 0 on a 2xx answer
  curl --silent --fail --max-time 3 --output /dev/null "$1" 2>/dev/null
}

pid_file() { printf '%s/%s.pid' "${RUN_DIR}" "$1"; }

# A process that exited but was not reaped yet (a zombie) still answers kill -0; the
# services are reparented to PID 1 when we exit, and some container inits reap late.
pid_alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local state
  state=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
  [[ -n "${state}" && "${state}" != Z ]]
}

# Marker that the pid in the pid file is really our process (pids get reused).
service_marker() {
  case $1 in
    kafka) printf 'kafka.Kafka' ;;
    minio) printf '%s' "${MINIO_BIN}" ;;
    prometheus) printf 'prometheus' ;;
  esac
}

service_pid() {  # prints the pid if the pid file names a live process of this service
  local pf pid
  pf=$(pid_file "$1")
  [[ -f "${pf}" ]] || return 1
  pid=$(<"${pf}")
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
  pid_alive "${pid}" || return 1
  tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -qF -- "$(service_marker "$1")" || return 1
  printf '%s' "${pid}"
}

service_ports() {
  case $1 in
    kafka) printf '%s %s' "${KAFKA_PORT}" "${KAFKA_CONTROLLER_PORT}" ;;
    minio) printf '%s %s' "${MINIO_PORT}" "${MINIO_CONSOLE_PORT}" ;;
    prometheus) printf '%s' "${PROMETHEUS_PORT}" ;;
  esac
}

healthy() {
  case $1 in
    kafka) if kafka_secure; then kafka_secure_healthy; else kafka_healthy; fi ;;
    minio)
      if minio_tls; then
        curl --silent --fail --max-time 3 --output /dev/null --cacert "${MINIO_TLS_DIR}/ca.crt" \
          "https://${BIND_HOST}:${MINIO_PORT}/minio/health/live" 2>/dev/null
      else
        http_ok "http://${BIND_HOST}:${MINIO_PORT}/minio/health/live"
      fi
      ;;
    prometheus) http_ok "http://${BIND_HOST}:${PROMETHEUS_PORT}/-/ready" ;;
  esac
}

# Kafka is healthy when a Metadata request (kafka_probe.py, stdlib-only Python) lists at least one broker: the
# socket server only serves requests once the broker has started and registered with the (co-located) controller.
# Without python3, fall back to the port plus the "Kafka Server started" line of the current log.
kafka_probe() {  # kafka_probe [CAFILE ENVFILE] -> the probe's verdict on ${KAFKA_PORT}
  local py
  if [[ -x /usr/bin/python3 ]]; then py=/usr/bin/python3; else py=$(command -v python3 || true); fi
  if [[ -z "${py}" ]]; then
    grep -q 'Kafka Server started' "${LOG_DIR}/kafka.log" 2>/dev/null
    return
  fi
  "${py}" "${SCRIPT_DIR}/kafka_probe.py" "${BIND_HOST}" "${KAFKA_PORT}" "$@" 2>/dev/null
}

kafka_healthy() {
  port_open "${KAFKA_PORT}" || return 1
  kafka_probe
}

# ---------------------------------------------------------------- TLS and SASL
# shellcheck source=deploy/local/security.sh
source "${SCRIPT_DIR}/security.sh"


wait_healthy() {  # wait_healthy NAME PID START_TS
  local name=$1 pid=$2 t0=$3 deadline
  deadline=$(($(date +%s) + START_TIMEOUT))
  while ! healthy "${name}"; do
    if ! pid_alive "${pid}"; then
      log "${name} exited during start-up; last lines of ${LOG_DIR}/${name}.log:"
      tail -n 25 "${LOG_DIR}/${name}.log" >&2 || true
      rm -f "$(pid_file "${name}")"
      die "${name} failed to start"
    fi
    if (($(date +%s) >= deadline)); then
      log "last lines of ${LOG_DIR}/${name}.log:"
      tail -n 25 "${LOG_DIR}/${name}.log" >&2 || true
      die "${name} (pid ${pid}) not healthy after ${START_TIMEOUT}s (TERRADAPT_START_TIMEOUT); it is left running, see the log or run 'down ${name}'"
    fi
    sleep 0.3
  done
  log "${name} healthy (pid ${pid}) in $(elapsed "${t0}")s"
}

rotate_log() {
  local f="${LOG_DIR}/$1.log"
  [[ -f "${f}" ]] && mv -f "${f}" "${f}.1"
  : >"${f}"
}

# Launch "$@" detached (own session, survives the caller's terminal), stdout+stderr
# to the service log, and record its pid. Extra environment goes through `env`.
launch() {
  local name=$1
  shift
  rotate_log "${name}"
  # 8>&- 9>&-: the service must not inherit our lock descriptors (it would hold
  # the lock for its whole life and block every later up/down).
  setsid "$@" >>"${LOG_DIR}/${name}.log" 2>&1 </dev/null 8>&- 9>&- &
  local pid=$!
  printf '%s\n' "${pid}" >"$(pid_file "${name}")"
  printf '%s' "${pid}"
}

# ---------------------------------------------------------------- install
install_kafka() {
  if [[ -f "${KAFKA_HOME}/.complete" && -f "${KAFKA_LIBS}/kafka_2.13-${KAFKA_VERSION}.jar" ]]; then
    log "kafka ${KAFKA_VERSION}: cached in ${KAFKA_LIBS}"
    return 0
  fi
  require_cmd java "install a Java 17+ runtime (apt-get install -y openjdk-17-jre-headless)"
  require_cmd mvn "install Maven (apt-get install -y maven)"
  local t0 tmp
  t0=$(now)
  log "kafka ${KAFKA_VERSION}: resolving broker jars from Maven Central into ${KAFKA_LIBS} ..."
  mkdir -p "${KAFKA_HOME}"
  tmp="${KAFKA_HOME}/libs.tmp"
  rm -rf "${tmp}"
  if ! mvn -q -B -Dmaven.repo.local="${MAVEN_REPO}" -Dkafka.version="${KAFKA_VERSION}" \
      -f "${SCRIPT_DIR}/kafka/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="${tmp}" >"${KAFKA_HOME}/mvn.log" 2>&1; then
    tail -n 30 "${KAFKA_HOME}/mvn.log" >&2 || true
    die "maven could not resolve org.apache.kafka:kafka_2.13:${KAFKA_VERSION} (full log: ${KAFKA_HOME}/mvn.log)"
  fi
  [[ -f "${tmp}/kafka_2.13-${KAFKA_VERSION}.jar" ]] || die "kafka_2.13-${KAFKA_VERSION}.jar missing after resolution"
  rm -rf "${KAFKA_LIBS}"
  mv "${tmp}" "${KAFKA_LIBS}"
  touch "${KAFKA_HOME}/.complete"
  log "kafka ${KAFKA_VERSION}: $(find "${KAFKA_LIBS}" -name '*.jar' | wc -l) jars in $(elapsed "${t0}")s"
}

minio_built_version() {  # the module version baked into the binary (empty if unknown)
  go version -m "${MINIO_BIN}" 2>/dev/null | awk '$1 == "mod" && $2 == "github.com/minio/minio" { print $3 }'
}

install_minio() {
  require_cmd go "install Go >= 1.24 (MinIO is built from source)"
  if [[ -x "${MINIO_BIN}" && "$(minio_built_version)" == "${MINIO_VERSION}" ]]; then
    log "minio ${MINIO_VERSION}: cached at ${MINIO_BIN}"
    return 0
  fi
  mkdir -p "${GO_PATH_DIR}"
  local t0
  t0=$(now)
  # Serialise with other builds started by this script (not with a hand-started one).
  exec 8>"${GO_PATH_DIR}/.build.lock"
  flock -w 1800 8 || die "another MinIO build holds ${GO_PATH_DIR}/.build.lock"
  if [[ -x "${MINIO_BIN}" && "$(minio_built_version)" == "${MINIO_VERSION}" ]]; then
    log "minio ${MINIO_VERSION}: built meanwhile by another process"
    return 0
  fi
  log "minio ${MINIO_VERSION}: building from source with go install (several minutes the first time; log ${GO_PATH_DIR}/build.log) ..."
  if ! GOPATH="${GO_PATH_DIR}" GOFLAGS=-modcacherw CGO_ENABLED=0 \
      go install "github.com/minio/minio@${MINIO_VERSION}" >"${GO_PATH_DIR}/build.log" 2>&1; then
    tail -n 30 "${GO_PATH_DIR}/build.log" >&2 || true
    die "go install github.com/minio/minio@${MINIO_VERSION} failed (full log: ${GO_PATH_DIR}/build.log)"
  fi
  [[ -x "${MINIO_BIN}" ]] || die "go install succeeded but ${MINIO_BIN} is missing"
  log "minio ${MINIO_VERSION}: built in $(elapsed "${t0}")s"
}

go_built_version() {  # go_built_version BIN MODULE: the module version baked into a go-installed binary (or empty)
  go version -m "$1" 2>/dev/null | awk -v m="$2" '$1 == "mod" && $2 == m { print $3 }'
}

# go_tool NAME PACKAGE MODULE VERSION: build PACKAGE@VERSION (binary NAME) into ${GO_PATH_DIR}/bin unless that
# version is there already
go_tool() {
  local name=$1 pkg=$2 module=$3 version=$4 bin build_log t0
  bin="${GO_PATH_DIR}/bin/${name}"
  build_log="${GO_PATH_DIR}/build-${name}.log"
  if [[ -x "${bin}" && "$(go_built_version "${bin}" "${module}")" == "${version}" ]]; then
    log "${name} ${version}: cached at ${bin}"
    return 0
  fi
  t0=$(now)
  log "${name} ${version}: building with go install (log ${build_log}) ..."
  if ! GOPATH="${GO_PATH_DIR}" GOFLAGS=-modcacherw CGO_ENABLED=0 go install "${pkg}@${version}" >"${build_log}" 2>&1; then
    tail -n 30 "${build_log}" >&2 || true
    die "go install ${pkg}@${version} failed (full log: ${build_log})"
  fi
  [[ -x "${bin}" ]] || die "go install succeeded but ${bin} is missing"
  log "${name} ${version}: built in $(elapsed "${t0}")s"
}

install_k8s_tools() {
  require_cmd go "install Go >= 1.26 (kustomize and kubeconform are built from source)"
  mkdir -p "${GO_PATH_DIR}"
  exec 8>"${GO_PATH_DIR}/.build.lock"
  flock -w 1800 8 || die "another Go build holds ${GO_PATH_DIR}/.build.lock"
  go_tool kustomize sigs.k8s.io/kustomize/kustomize/v5 sigs.k8s.io/kustomize/kustomize/v5 "${KUSTOMIZE_VERSION}"
  go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform github.com/yannh/kubeconform \
    "${KUBECONFORM_VERSION}"
}

install_prometheus() {
  if command -v prometheus >/dev/null 2>&1; then
    log "prometheus: $(command -v prometheus) ($(prometheus --version 2>&1 | head -n 1))"
    return 0
  fi
  require_cmd apt-get "install the Prometheus server by hand and put 'prometheus' on PATH"
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "prometheus is missing and installing it needs root: apt-get install -y --no-install-recommends prometheus"
    sudo=(sudo -n)
  fi
  local t0
  t0=$(now)
  log "prometheus: installing the Debian package ..."
  if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || die "apt-get install prometheus failed"
  # The package may start a system service on hosts with systemd; we run our own.
  log "prometheus: installed in $(elapsed "${t0}")s"
}

cmd_install() {
  local targets=("$@")
  ((${#targets[@]})) || targets=(all)
  local t
  for t in "${targets[@]}"; do
    case ${t} in
      all) install_kafka; install_minio; install_prometheus; install_k8s_tools ;;
      kafka) install_kafka ;;
      minio) install_minio ;;
      prometheus) install_prometheus ;;
      k8s-tools) install_k8s_tools ;;
      *) die "unknown service '${t}' (kafka, minio, prometheus, k8s-tools, all)" ;;
    esac
  done
}

# ---------------------------------------------------------------- start
ensure_ports_free() {
  local name=$1 p
  for p in $(service_ports "${name}"); do
    if port_open "${p}"; then
      die "${name}: port ${BIND_HOST}:${p} is already in use by another process (not started by this script: no live pid in $(pid_file "${name}")); stop it or set TERRADAPT_*_PORT"
    fi
  done
}

start_kafka() {
  [[ -f "${KAFKA_HOME}/.complete" ]] || install_kafka
  require_cmd java "install a Java 17+ runtime"
  local java_major
  java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
  [[ "${java_major:-0}" -ge 17 ]] || die "kafka ${KAFKA_VERSION} needs Java 17+, found '$(java -version 2>&1 | head -n 1)'"
  local dir="${RUN_DIR}/kafka" data="${RUN_DIR}/kafka/data" client=PLAINTEXT mode
  mkdir -p "${dir}" "${data}"
  mode=$(kafka_formatted_mode)
  if [[ "${KAFKA_SECURE}" == 1 && -n "${mode}" && "${mode}" != SASL_SSL ]]; then
    die "kafka: ${data} was formatted for ${mode}; TERRADAPT_KAFKA_SECURE=1 needs a fresh storage (delete ${dir})"
  fi
  if kafka_secure; then
    client=SASL_SSL
    ensure_kafka_creds
    ensure_kafka_keystore
  fi
  # Holds the keystore and SCRAM passwords in secure mode: private before anything is written to it.
  touch "${dir}/server.properties"
  chmod 600 "${dir}/server.properties"
  cat >"${dir}/server.properties" <<EOF
# Generated by deploy/local/services.sh on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@${BIND_HOST}:${KAFKA_CONTROLLER_PORT}
listeners=${client}://${BIND_HOST}:${KAFKA_PORT},CONTROLLER://${BIND_HOST}:${KAFKA_CONTROLLER_PORT}
advertised.listeners=${client}://${BIND_HOST}:${KAFKA_PORT}
controller.listener.names=CONTROLLER
inter.broker.listener.name=${client}
listener.security.protocol.map=CONTROLLER:PLAINTEXT,${client}:${client}
log.dirs=${data}
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=104857600
EOF
  if [[ "${client}" == SASL_SSL ]]; then
    # The single node is its own inter-broker peer on the SASL_SSL listener (as the generated SCRAM user);
    # the controller listener stays PLAINTEXT on loopback. No authorizer: every authenticated user may act.
    cat >>"${dir}/server.properties" <<EOF
# SASL_SSL client listener (TERRADAPT_KAFKA_SECURE=1)
sasl.enabled.mechanisms=${KAFKA_SASL_MECHANISM}
sasl.mechanism.inter.broker.protocol=${KAFKA_SASL_MECHANISM}
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$(kafka_cred KAFKA_SASL_USERNAME)" password="$(kafka_cred KAFKA_SASL_PASSWORD)";
ssl.keystore.type=PKCS12
ssl.keystore.location=${KAFKA_TLS_DIR}/broker.p12
ssl.keystore.password=$(<"${KAFKA_TLS_DIR}/keystore.password")
ssl.key.password=$(<"${KAFKA_TLS_DIR}/keystore.password")
ssl.truststore.type=PEM
ssl.truststore.location=${KAFKA_TLS_DIR}/ca.crt
ssl.client.auth=none
ssl.endpoint.identification.algorithm=https
EOF
  fi
  cat >"${dir}/log4j2.properties" <<'EOF'
# Generated by deploy/local/services.sh; stdout goes to $RUN_DIR/logs/kafka.log.
status = warn
# Let Kafka log its own shutdown to the end (log4j's hook would stop logging first).
shutdownHook = disable
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.controller.name = kafka.controller
logger.controller.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.logcleaner.name = kafka.log.LogCleaner
logger.logcleaner.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
  local jvm_common=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=${dir}/log4j2.properties")
  # Format the storage once (what bin/kafka-storage.sh format does).
  if [[ ! -f "${data}/meta.properties" ]]; then
    local cluster_id scram=()
    if [[ -s "${dir}/cluster.id" ]]; then
      cluster_id=$(<"${dir}/cluster.id")
    else
      # Same format as `kafka-storage.sh random-uuid` (URL-safe base64 of 16 random
      # bytes, not starting with '-'), without paying for a JVM start.
      cluster_id=-
      while [[ "${cluster_id}" == -* ]]; do
        cluster_id=$(openssl rand -base64 16 | tr '+/' '-_' | tr -d '=\n')
      done
      [[ "${cluster_id}" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka: could not generate a cluster id (got '${cluster_id}')"
      printf '%s\n' "${cluster_id}" >"${dir}/cluster.id"
    fi
    # The SCRAM user goes into the cluster metadata at format time (the broker's own StorageTool).
    [[ "${client}" == SASL_SSL ]] && scram=(--add-scram
      "${KAFKA_SASL_MECHANISM}=[name=$(kafka_cred KAFKA_SASL_USERNAME),password=$(kafka_cred KAFKA_SASL_PASSWORD)]")
    log "kafka: formatting ${data} (cluster id ${cluster_id}, ${client} client listener)"
    # shellcheck disable=SC2086  # KAFKA_HEAP_OPTS is a list of JVM flags
    java ${KAFKA_HEAP_OPTS} "${jvm_common[@]}" -cp "${KAFKA_LIBS}/*" kafka.tools.StorageTool format \
      -t "${cluster_id}" -c "${dir}/server.properties" "${scram[@]}" >"${LOG_DIR}/kafka-format.log" 2>&1 \
      || { cat "${LOG_DIR}/kafka-format.log" >&2; die "kafka storage format failed"; }
    printf '%s\n' "${client}" >"${dir}/security"
  fi
  local t0 pid
  t0=$(now)
  # shellcheck disable=SC2086
  pid=$(launch kafka java ${KAFKA_HEAP_OPTS} "${jvm_common[@]}" \
    "-Xlog:gc*:file=${LOG_DIR}/kafka-gc.log:time,tags:filecount=2,filesize=10M" \
    -cp "${KAFKA_LIBS}/*" kafka.Kafka "${dir}/server.properties")
  log "kafka: started pid ${pid} on ${BIND_HOST}:${KAFKA_PORT} (${client}; controller ${KAFKA_CONTROLLER_PORT}), waiting for the broker ..."
  wait_healthy kafka "${pid}" "${t0}"
}

# write_credentials FILE USER_KEY PASS_KEY: a random user and password as KEY=value lines, readable by the owner only
write_credentials() {
  local user pass
  user="td$(openssl rand -hex 9)"
  pass="$(openssl rand -hex 24)"
  (umask 077 && printf '%s=%s\n%s=%s\n' "$2" "${user}" "$3" "${pass}" >"$1")
}

ensure_minio_creds() {
  ensure_run_dir
  if [[ ! -s "${MINIO_ENV_FILE}" ]]; then
    write_credentials "${MINIO_ENV_FILE}" MINIO_ROOT_USER MINIO_ROOT_PASSWORD
    log "minio: generated credentials in ${MINIO_ENV_FILE} (mode 600; print them with 'services.sh env')"
  fi
  chmod 600 "${MINIO_ENV_FILE}"
}

minio_cred() {  # minio_cred MINIO_ROOT_USER|MINIO_ROOT_PASSWORD
  sed -n "s/^$1=//p" "${MINIO_ENV_FILE}" | head -n 1
}

start_minio() {
  [[ -x "${MINIO_BIN}" ]] || install_minio
  ensure_minio_creds
  local data="${RUN_DIR}/minio/data" t0 pid user pass tls=() scheme=http
  mkdir -p "${data}"
  if [[ "${MINIO_TLS}" == 1 ]]; then
    # MinIO reads public.crt / private.key from --certs-dir
    ensure_tls "${MINIO_TLS_DIR}"
    mkdir -p "${MINIO_TLS_DIR}/certs"
    (umask 077 && cp "${MINIO_TLS_DIR}/server.crt" "${MINIO_TLS_DIR}/certs/public.crt" \
      && cp "${MINIO_TLS_DIR}/server.key" "${MINIO_TLS_DIR}/certs/private.key")
    tls=(--certs-dir "${MINIO_TLS_DIR}/certs")
    scheme=https
  fi
  printf '%s\n' "${scheme}" >"${RUN_DIR}/minio/scheme"
  user=$(minio_cred MINIO_ROOT_USER)
  pass=$(minio_cred MINIO_ROOT_PASSWORD)
  [[ -n "${user}" && -n "${pass}" ]] || die "minio: ${MINIO_ENV_FILE} lacks MINIO_ROOT_USER/MINIO_ROOT_PASSWORD; delete it to regenerate (existing data keeps the old ones)"
  t0=$(now)
  # Credentials go through the environment (not argv, visible in ps); --quiet keeps
  # the start-up banner out of the log and --anonymous hides sensitive values in it.
  # Metrics (/minio/v2/metrics/cluster) are public so Prometheus can scrape them
  # without a bearer token: acceptable as everything is bound to loopback.
  pid=$(launch minio env MINIO_ROOT_USER="${user}" MINIO_ROOT_PASSWORD="${pass}" \
    MINIO_UPDATE=off MINIO_PROMETHEUS_AUTH_TYPE=public \
    "${MINIO_BIN}" server --quiet --anonymous "${tls[@]}" \
    --address "${BIND_HOST}:${MINIO_PORT}" --console-address "${BIND_HOST}:${MINIO_CONSOLE_PORT}" \
    "${data}")
  log "minio: started pid ${pid} on ${scheme}://${BIND_HOST}:${MINIO_PORT} (console ${MINIO_CONSOLE_PORT}), waiting ..."
  wait_healthy minio "${pid}" "${t0}"
}

start_prometheus() {
  command -v prometheus >/dev/null 2>&1 || install_prometheus
  local dir="${RUN_DIR}/prometheus" config t0 pid
  mkdir -p "${dir}/data"
  if [[ -n "${PROMETHEUS_CONFIG}" ]]; then
    [[ -f "${PROMETHEUS_CONFIG}" ]] || die "TERRADAPT_PROMETHEUS_CONFIG=${PROMETHEUS_CONFIG}: no such file"
    config="$(cd "$(dirname "${PROMETHEUS_CONFIG}")" && pwd)/$(basename "${PROMETHEUS_CONFIG}")"
  else
    config="${dir}/prometheus.yml"
    cat >"${config}" <<EOF
# Generated by deploy/local/services.sh (set TERRADAPT_PROMETHEUS_CONFIG to use another).
global:
  scrape_interval: 5s
  evaluation_interval: 5s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["${BIND_HOST}:${PROMETHEUS_PORT}"]
EOF
  fi
  if command -v promtool >/dev/null 2>&1; then
    promtool check config "${config}" >"${LOG_DIR}/promtool.log" 2>&1 \
      || { cat "${LOG_DIR}/promtool.log" >&2; die "prometheus: invalid configuration ${config}"; }
  fi
  t0=$(now)
  pid=$(launch prometheus prometheus --config.file="${config}" --storage.tsdb.path="${dir}/data" \
    --web.listen-address="${BIND_HOST}:${PROMETHEUS_PORT}")
  log "prometheus: started pid ${pid} on ${BIND_HOST}:${PROMETHEUS_PORT} with ${config}, waiting ..."
  wait_healthy prometheus "${pid}" "${t0}"
}

start_service() {
  local name=$1 pid
  if pid=$(service_pid "${name}"); then
    if healthy "${name}"; then
      log "${name}: already running and healthy (pid ${pid})"
      return 0
    fi
    log "${name}: running (pid ${pid}) but not healthy yet, waiting ..."
    wait_healthy "${name}" "${pid}" "$(now)"
    return 0
  fi
  rm -f "$(pid_file "${name}")"
  ensure_ports_free "${name}"
  "start_${name}"
}

# ---------------------------------------------------------------- stop
stop_service() {
  local name=$1 pid t0 deadline
  if ! pid=$(service_pid "${name}"); then
    rm -f "$(pid_file "${name}")"
    log "${name}: not running"
    return 0
  fi
  t0=$(now)
  kill -TERM "${pid}" 2>/dev/null || true
  deadline=$(($(date +%s) + STOP_TIMEOUT))
  while pid_alive "${pid}"; do
    if (($(date +%s) >= deadline)); then
      log "${name}: still alive after ${STOP_TIMEOUT}s, sending SIGKILL to ${pid}"
      kill -KILL "${pid}" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  rm -f "$(pid_file "${name}")"
  log "${name}: stopped (pid ${pid}) in $(elapsed "${t0}")s"
}

# ---------------------------------------------------------------- commands
NAMES=()
parse_names() {  # validates service names into NAMES
  local n
  NAMES=()
  for n in "$@"; do
    case ${n} in
      kafka | minio | prometheus) NAMES+=("${n}") ;;
      all) NAMES+=("${ALL_SERVICES[@]}") ;;
      *) die "unknown service '${n}' (kafka, minio, prometheus, all)" ;;
    esac
  done
}

cmd_up() {
  local n
  (($#)) || set -- "${DEFAULT_UP[@]}"
  parse_names "$@"
  require_cmd curl "needed for health checks (apt-get install -y curl)"
  require_cmd openssl "needed to generate credentials (apt-get install -y openssl)"
  require_cmd setsid "part of util-linux"
  require_cmd flock "part of util-linux"
  take_lock
  for n in "${NAMES[@]}"; do start_service "${n}"; done
}

cmd_down() {
  local n
  (($#)) || set -- "${ALL_SERVICES[@]}"
  parse_names "$@"
  take_lock
  for n in "${NAMES[@]}"; do stop_service "${n}"; done
}

cmd_status() {
  local n pid state rc=0
  for n in "${ALL_SERVICES[@]}"; do
    if pid=$(service_pid "${n}"); then
      if healthy "${n}"; then state="healthy"; else state="running, NOT healthy"; rc=1; fi
      printf '%-11s %-22s pid %-8s ports %s\n' "${n}" "${state}" "${pid}" "$(service_ports "${n}")"
    else
      printf '%-11s %-22s\n' "${n}" "stopped"
    fi
  done
  printf 'run dir: %s\n' "${RUN_DIR}"
  return "${rc}"
}

cmd_env() {
  ensure_minio_creds
  printf 'export TERRADAPT_KAFKA__BOOTSTRAP=%s:%s\n' "${BIND_HOST}" "${KAFKA_PORT}"
  if kafka_secure; then
    ensure_kafka_creds
    printf 'export TERRADAPT_KAFKA__SECURITY_PROTOCOL=SASL_SSL\n'
    printf 'export TERRADAPT_KAFKA__SASL_MECHANISM=%s\n' "${KAFKA_SASL_MECHANISM}"
    printf 'export TERRADAPT_KAFKA__USERNAME=%s\n' "$(kafka_cred KAFKA_SASL_USERNAME)"
    printf 'export TERRADAPT_KAFKA__PASSWORD_FILE=%s\n' "${KAFKA_PASSWORD_FILE}"
    printf 'export TERRADAPT_KAFKA__CA_FILE=%s\n' "${KAFKA_TLS_DIR}/ca.crt"
  fi
  printf 'export TERRADAPT_S3__ENDPOINT=%s:%s\n' "${BIND_HOST}" "${MINIO_PORT}"
  if minio_tls; then
    printf 'export TERRADAPT_S3__SECURE=true\n'
    printf 'export TERRADAPT_S3__CA_FILE=%s\n' "${MINIO_TLS_DIR}/ca.crt"
  else
    printf 'export TERRADAPT_S3__SECURE=false\n'
  fi
  printf 'export TERRADAPT_S3__ACCESS_KEY=%s\n' "$(minio_cred MINIO_ROOT_USER)"
  printf 'export TERRADAPT_S3__SECRET_KEY=%s\n' "$(minio_cred MINIO_ROOT_PASSWORD)"
  printf 'export TERRADAPT_PROMETHEUS__URL=http://%s:%s\n' "${BIND_HOST}" "${PROMETHEUS_PORT}"
}

main() {
  local cmd=${1:-}
  [[ -n "${cmd}" ]] || { usage >&2; exit 2; }
  shift
  validate_settings
  case ${cmd} in
    install) cmd_install "$@" ;;
    up | start) cmd_up "$@" ;;
    down | stop) cmd_down "$@" ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *) usage >&2; die "unknown command '${cmd}'" ;;
  esac
}

main "$@"
