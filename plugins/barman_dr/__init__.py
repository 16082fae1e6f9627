"""barman-dr: PostgreSQL disaster recovery with Barman, orchestrated by Airflow 3.

The package is imported by DAG files and by the Airflow plugin. Importing it does no I/O
and pulls in no Airflow machinery; hooks and operators live in their own modules.
"""

__version__ = "0.1.0"
