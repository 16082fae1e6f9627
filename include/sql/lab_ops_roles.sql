-- Roles of the ops cluster (lab): Airflow metadata owner and the two audit roles.
-- Idempotent: creates what is missing, (re)sets passwords from the lab's secrets.
SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['airflow', 'dr_audit_owner', 'dr_audit_writer']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE airflow PASSWORD :'airflow_pw';
ALTER ROLE dr_audit_owner PASSWORD :'owner_pw';
-- the writer can only append and read; it owns nothing and cannot change the schema
ALTER ROLE dr_audit_writer PASSWORD :'writer_pw' NOSUPERUSER NOCREATEDB NOCREATEROLE;
