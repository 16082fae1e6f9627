"""Each DAG's params, typed and validated before any side effect (pure: no I/O)."""
