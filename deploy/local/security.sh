# Sourced by services.sh: TLS and SASL for the local Kafka (TERRADAPT_KAFKA_SECURE=1) and MinIO (TERRADAPT_MINIO_TLS=1).
# Uses the settings and helpers services.sh defines before sourcing it; see README.md "Secured services".
# shellcheck shell=bash

# The storage remembers the mode it was formatted with (SCRAM users are written at format time).
kafka_formatted_mode() { cat "${RUN_DIR}/kafka/security" 2>/dev/null || true; }

kafka_secure() {  # 0 when Kafka runs (or is to run) with the SASL_SSL client listener
  local mode
  mode=$(kafka_formatted_mode)
  if [[ -n "${mode}" ]]; then [[ "${mode}" == SASL_SSL ]]; else [[ "${KAFKA_SECURE}" == 1 ]]; fi
}

minio_tls() {  # 0 when MinIO serves (or is to serve) https
  [[ "${MINIO_TLS}" == 1 ]] && return 0
  # not asked for: still https while a MinIO started with TLS runs (status, env)
  service_pid minio >/dev/null && [[ "$(cat "${RUN_DIR}/minio/scheme" 2>/dev/null)" == https ]]
}

# ensure_tls DIR: a CA and a server certificate for 127.0.0.1 / localhost signed by it, made once per run dir
# (clients keep trusting DIR/ca.crt across restarts). Keys and folder are private (600 / 700).
ensure_tls() {
  local d=$1
  [[ -s "${d}/ca.crt" && -s "${d}/server.crt" && -s "${d}/server.key" ]] && return 0
  require_cmd openssl "needed to make TLS certificates"
  mkdir -p "${d}"
  chmod 700 "${d}"
  if ! (
    set -e
    umask 077
    cd "${d}"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 825 -subj "/CN=terradapt local CA" \
      -keyout ca.key -out ca.crt -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" -addext "subjectKeyIdentifier=hash"
    openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" -keyout server.key -out server.csr
    printf '%s\n' "subjectAltName=IP:${BIND_HOST},DNS:localhost" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
      "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >server.ext
    openssl x509 -req -sha256 -days 825 -in server.csr -CA ca.crt -CAkey ca.key \
      -set_serial "0x$(openssl rand -hex 12)" -extfile server.ext -out server.crt
    rm -f server.csr server.ext
  ) >"${LOG_DIR}/tls.log" 2>&1; then
    cat "${LOG_DIR}/tls.log" >&2
    die "could not make TLS certificates in ${d}"
  fi
  log "tls: made a CA and a certificate for ${BIND_HOST}/localhost in ${d}"
}

kafka_cred() {  # kafka_cred KAFKA_SASL_USERNAME|KAFKA_SASL_PASSWORD
  sed -n "s/^$1=//p" "${KAFKA_CLIENT_ENV}" | head -n 1
}

# The SCRAM user of the secured broker: made once, before the storage is formatted with it.
ensure_kafka_creds() {
  ensure_run_dir
  if [[ ! -s "${KAFKA_CLIENT_ENV}" ]]; then
    [[ -f "${RUN_DIR}/kafka/data/meta.properties" ]] \
      && die "kafka: ${KAFKA_CLIENT_ENV} is missing but the storage is formatted (its SCRAM user was made then); delete ${RUN_DIR}/kafka to start over"
    write_credentials "${KAFKA_CLIENT_ENV}" KAFKA_SASL_USERNAME KAFKA_SASL_PASSWORD
    log "kafka: generated SCRAM credentials in ${KAFKA_CLIENT_ENV} (mode 600)"
  fi
  chmod 600 "${KAFKA_CLIENT_ENV}"
  # the password alone, for TERRADAPT_KAFKA__PASSWORD_FILE (a mounted secret in a cluster)
  (umask 077 && kafka_cred KAFKA_SASL_PASSWORD >"${KAFKA_PASSWORD_FILE}")
  chmod 600 "${KAFKA_PASSWORD_FILE}"
}

# The broker's PKCS12 keystore (server certificate + key + CA chain) under a random password.
ensure_kafka_keystore() {
  ensure_tls "${KAFKA_TLS_DIR}"
  local d="${KAFKA_TLS_DIR}"
  [[ -s "${d}/broker.p12" && -s "${d}/keystore.password" ]] && return 0
  (umask 077 && openssl rand -hex 16 >"${d}/keystore.password")
  (umask 077 && openssl pkcs12 -export -in "${d}/server.crt" -inkey "${d}/server.key" -certfile "${d}/ca.crt" \
    -name broker -passout "file:${d}/keystore.password" -out "${d}/broker.p12") >>"${LOG_DIR}/tls.log" 2>&1 \
    || { cat "${LOG_DIR}/tls.log" >&2; die "kafka: could not make the PKCS12 keystore"; }
}

# Secured broker health: kafka_probe.py with TLS verified against the run dir's CA and a SCRAM-SHA-512 login with
# the generated user (the password is read from the file, not argv).
kafka_secure_healthy() {
  port_open "${KAFKA_PORT}" || return 1
  kafka_probe "${KAFKA_TLS_DIR}/ca.crt" "${KAFKA_CLIENT_ENV}"
}
