#!/bin/sh
# Creates the audit database and its roles on the ops cluster (first start only).
set -e
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" <<SQL
CREATE ROLE dr_audit_owner LOGIN;
CREATE ROLE dr_audit_writer LOGIN PASSWORD '${DR_AUDIT_PASSWORD:-change-me}';
CREATE DATABASE dr_audit OWNER dr_audit_owner;
SQL
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d dr_audit -f /docker-entrypoint-initdb.d/sql/audit_schema.sql
