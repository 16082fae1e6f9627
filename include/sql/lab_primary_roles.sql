-- Roles of the lab primary. Barman gets the least privileges Barman's documentation lists
-- for backup_method=postgres on PostgreSQL 15; streaming roles get REPLICATION only.
SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['dr_admin', 'barman', 'streaming_barman', 'replicator', 'app']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE dr_admin SUPERUSER PASSWORD :'dr_admin_pw';
ALTER ROLE barman PASSWORD :'barman_pw';
ALTER ROLE streaming_barman REPLICATION PASSWORD :'streaming_barman_pw';
ALTER ROLE replicator REPLICATION PASSWORD :'replicator_pw';
ALTER ROLE app PASSWORD :'app_pw';
GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO barman;
GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO barman;
GRANT EXECUTE ON FUNCTION pg_switch_wal() TO barman;
GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO barman;
GRANT pg_read_all_settings TO barman;
GRANT pg_read_all_stats TO barman;
GRANT pg_checkpoint TO barman;
