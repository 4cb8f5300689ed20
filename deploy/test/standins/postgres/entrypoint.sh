#!/bin/sh
# setpriv (util-linux) where the official image uses gosu: no PAM session, unlike runuser.
set -eu
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
  echo "Error: Database is uninitialized and superuser password is not specified." >&2
  exit 1
fi
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp) && printf '%s' "$POSTGRES_PASSWORD" > "$pw" && chown postgres "$pw"
  # shellcheck disable=SC2086
  as_postgres initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" \
    --auth-host=scram-sha-256 --auth-local=trust --no-sync ${POSTGRES_INITDB_ARGS:-} >/dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  as_postgres postgres --single -D "$PGDATA" postgres >/dev/null \
    <<SQL
CREATE DATABASE "$POSTGRES_DB" OWNER "$POSTGRES_USER";
SQL
fi
if [ "$1" = "postgres" ]; then
  shift
  # A test's database is thrown away: no fsync (Synapse creates its schema several times
  # faster on a busy disk). The official image keeps PostgreSQL's durable defaults.
  exec setpriv --reuid=postgres --regid=postgres --init-groups -- postgres -D "$PGDATA" \
    -c listen_addresses='*' -c fsync=off -c synchronous_commit=off -c full_page_writes=off "$@"
fi
exec "$@"
