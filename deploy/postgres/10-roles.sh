#!/usr/bin/env bash
# The database's roles, made once by the postgres image when its data
# directory is first created (it runs /docker-entrypoint-initdb.d/*.sh as the
# superuser, POSTGRES_USER, on the database POSTGRES_DB):
#
#   penora_owner  owns the database and, through `penora-ops migrate` (the
#                 compose file's `migrate` service), every table, trigger and
#                 function in it. Not a superuser; nothing connects as it but
#                 the migrations.
#   penora_app    what penora-api and penora-worker connect as
#                 (DB_MIGRATE_ON_START=false): no superuser, no CREATEDB or
#                 CREATEROLE, owns nothing, so it cannot drop or disable the
#                 triggers that keep the ledger and the audit append-only.
#                 Migration V12 grants it rows to read and write and takes
#                 UPDATE and DELETE on the append-only tables away.
#
# Passwords come from PENORA_DB_OWNER_PASSWORD and PENORA_DB_APP_PASSWORD
# (the compose file's defaults are for a machine of one's own only). A data
# directory made before this script existed has neither role: create them as
# below by hand (psql as the superuser), or start from an empty volume
# (`docker compose down -v`, which deletes the data).
set -euo pipefail
: "${PENORA_DB_OWNER_PASSWORD:?set PENORA_DB_OWNER_PASSWORD}"
: "${PENORA_DB_APP_PASSWORD:?set PENORA_DB_APP_PASSWORD}"
# psql fills :'name' (a quoted literal) and :"name" (a quoted identifier)
# itself, so no password or name is ever spliced into SQL by the shell.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v db="$POSTGRES_DB" \
  -v owner_password="$PENORA_DB_OWNER_PASSWORD" \
  -v app_password="$PENORA_DB_APP_PASSWORD" <<'SQL'
CREATE ROLE penora_owner LOGIN PASSWORD :'owner_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
CREATE ROLE penora_app LOGIN PASSWORD :'app_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
-- The owner of the database owns its public schema too, where the
-- migrations create the tables.
ALTER DATABASE :"db" OWNER TO penora_owner;
ALTER SCHEMA public OWNER TO penora_owner;
-- Nobody else connects, and nobody but the owner creates anything there
-- (the schema part is PostgreSQL 15's default already).
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO penora_app;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
