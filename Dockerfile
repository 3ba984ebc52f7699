# Multi-stage build: compile with the Rust toolchain, run on a slim image as a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin egain-proxy

FROM debian:bookworm-slim
# ca-certificates: the platform roots (the binary also carries Mozilla's roots).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home egain
COPY --from=build /src/target/release/egain-proxy /usr/local/bin/egain-proxy
COPY proxy.toml /etc/egain-proxy/proxy.toml
ENV EGAIN_PROXY_CONFIG=/etc/egain-proxy/proxy.toml
USER 10001:10001
EXPOSE 8080 9901
# Inside a container the proxy must listen on 0.0.0.0 to be reachable, and the proxy refuses a
# non-loopback listener unless it is protected: add [server.access] (api_keys and/or allow) to
# your proxy.toml, or set `server.open = true` only when the container network itself is the
# boundary. For example:
#   docker run -e EGAIN_PROXY_LISTEN=0.0.0.0:8080 -e PROXY_KEY=... \
#     -v $PWD/proxy.toml:/etc/egain-proxy/proxy.toml:ro egain-proxy
# The admin listener stays on 127.0.0.1 unless you change [admin].listen.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/egain-proxy"]
CMD ["run"]
