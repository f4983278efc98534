#!/bin/sh
# PostgreSQL for the compose `cluster` profile (docker-compose.yml): the same start on the
# official postgres image and on any Debian image with the postgresql package. The first
# start makes the database cluster in $PGDATA, with the broker's user and database
# (POSTGRES_PASSWORD is its password); every start then runs the server in the
# foreground as the postgres user, listening on the compose network with passwords
# (scram-sha-256) required from every other host.
set -eu

bin=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/postgres | sort -V | tail -n 1)")
: "${PGDATA:=/var/lib/agent-comms-postgres/data}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD, the password of the broker's database user}"
as_postgres() { runuser -u postgres -- "$@"; }

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # UTF-8 whatever the image's locale (a minimal image has none: SQL_ASCII otherwise).
    as_postgres "$bin/initdb" -D "$PGDATA" -U postgres --encoding=UTF8 --no-locale \
        --auth-local=peer --auth-host=scram-sha-256
    as_postgres "$bin/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses=''" start
    # The password goes through a psql variable, quoted by psql: never pasted into SQL.
    as_postgres "$bin/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -v password="$POSTGRES_PASSWORD" <<'SQL'
CREATE ROLE agent_comms LOGIN PASSWORD :'password';
CREATE DATABASE agent_comms OWNER agent_comms;
SQL
    as_postgres "$bin/pg_ctl" -D "$PGDATA" -w -m fast stop
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi

exec runuser -u postgres -- "$bin/postgres" -D "$PGDATA" -c listen_addresses='*'
