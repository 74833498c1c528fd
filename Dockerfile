# Two images from one build: `gateway` (distroless, non-root) and `runner` (Debian slim, non-root,
# with a shell and the usual tools for the commands it runs, and bubblewrap, which builds each run's
# sandbox; Debian's bwrap is not setuid: it relies on unprivileged user namespaces). Build with
#   docker build --target gateway -t custodian:dev .
#   docker build --target runner  -t custodian-runner:dev .
# The build stage runs the same cargo command as CI's build step.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins

FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
COPY --from=build /src/target/release/custodian /usr/local/bin/custodian
COPY config/custodian.example.toml /etc/custodian/custodian.toml
USER nonroot:nonroot
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/custodian"]
CMD ["serve", "--config", "/etc/custodian/custodian.toml"]

FROM debian:bookworm-slim AS runner
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap ca-certificates curl postgresql-client python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/custodian-runner --create-home runner
COPY --from=build /src/target/release/custodian-runner /src/target/release/custodian-sandbox /usr/local/bin/
USER 10001:10001
EXPOSE 7443
ENTRYPOINT ["/usr/local/bin/custodian-runner"]
CMD ["--config", "/etc/custodian-runner/runner.toml"]
