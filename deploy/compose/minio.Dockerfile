# MinIO community edition from source, same pinned commit as deploy/local/services.sh.
FROM golang:1.24-bookworm AS build
ARG MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
ENV CGO_ENABLED=0
RUN go install "github.com/minio/minio@${MINIO_VERSION}"

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 1000 --home-dir /data --no-create-home minio \
 && mkdir -p /data && chown minio /data
COPY --from=build /go/bin/minio /usr/local/bin/minio
USER minio
VOLUME ["/data"]
EXPOSE 19000 19001
ENTRYPOINT ["/usr/local/bin/minio"]
