-- barman-dr audit trail: one append-only table of events.
--
-- Lives in the `dr_audit` database on the ops cluster, never on a server barman-dr may
-- restore, so a PITR can not rewind its own evidence. Applied by the schema owner
-- (dr_audit_owner); tasks connect as dr_audit_writer, which may INSERT and SELECT only.
-- Append-only is enforced by the database: UPDATE, DELETE and TRUNCATE raise an error
-- for every role, the owner included (only a superuser dropping the triggers could
-- change history, and that is itself visible in the PostgreSQL log).
CREATE SCHEMA IF NOT EXISTS audit;

CREATE TABLE IF NOT EXISTS audit.events (
    event_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_time   timestamptz NOT NULL DEFAULT clock_timestamp(),
    dag_id       text,
    run_id       text,
    task_id      text,
    try_number   integer,
    triggered_by text,
    server       text,
    action       text        NOT NULL,
    target       text,
    argv         jsonb,
    exit_code    integer,
    duration_s   double precision,
    outcome      text        NOT NULL CHECK (outcome IN ('started', 'ok', 'failed', 'refused', 'planned', 'info', 'warning', 'critical')),
    incident_id  text,
    details      jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS events_server_time_idx ON audit.events (server, event_time DESC);
CREATE INDEX IF NOT EXISTS events_run_idx ON audit.events (dag_id, run_id);
CREATE INDEX IF NOT EXISTS events_incident_idx ON audit.events (incident_id) WHERE incident_id IS NOT NULL;
-- the DR page at fleet scale (10,000+ events, 50 servers): each section reads exactly what it shows
CREATE INDEX IF NOT EXISTS events_server_action_time_idx ON audit.events (server, action, event_time DESC);
CREATE INDEX IF NOT EXISTS events_action_id_idx ON audit.events (action, event_id DESC);
CREATE INDEX IF NOT EXISTS events_run_id_idx ON audit.events (run_id);

CREATE OR REPLACE FUNCTION audit.reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit.events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Record a new event instead of changing history.';
END;
$$;

DROP TRIGGER IF EXISTS events_no_update_delete ON audit.events;
CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON audit.events
    FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
DROP TRIGGER IF EXISTS events_no_truncate ON audit.events;
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON audit.events
    FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();

REVOKE ALL ON SCHEMA audit FROM PUBLIC;
REVOKE ALL ON audit.events FROM PUBLIC;
GRANT USAGE ON SCHEMA audit TO dr_audit_writer;
GRANT SELECT, INSERT ON audit.events TO dr_audit_writer;
REVOKE UPDATE, DELETE, TRUNCATE ON audit.events FROM dr_audit_writer;
-- the writer may not create objects in the database's public schema either
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- Control state that must also survive a PITR of a managed server: the per-server lock
-- that keeps two DR runs from touching the same server at once. Unlike audit.events
-- this table is mutable (a lock is taken and released); every take and release is also
-- recorded as an audit event.
CREATE SCHEMA IF NOT EXISTS control;
CREATE TABLE IF NOT EXISTS control.server_locks (
    server      text PRIMARY KEY,
    dag_id      text NOT NULL,
    run_id      text NOT NULL,
    purpose     text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
REVOKE ALL ON SCHEMA control FROM PUBLIC;
GRANT USAGE ON SCHEMA control TO dr_audit_writer;
GRANT SELECT, INSERT, DELETE ON control.server_locks TO dr_audit_writer;
