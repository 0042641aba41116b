# redrive, built from source. librdkafka is compiled by the rdkafka crate, so the build stage needs
# a C toolchain and cmake; queries are checked against the committed .sqlx/ data (no database).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake build-essential libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV SQLX_OFFLINE=true
RUN cargo build --release --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 redrive
COPY --from=build /src/target/release/redrive /src/target/release/redrive-demo /usr/local/bin/
USER redrive
EXPOSE 9464
ENTRYPOINT ["redrive"]
CMD ["run"]
