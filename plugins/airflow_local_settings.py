"""Airflow cluster policies for barman-dr (Airflow imports this module from the plugins folder).

`task_instance_mutation_hook` routes the site-bound tasks of the server-parameterised DR DAGs
to the Celery queue of the run's server's barman host (see barman_dr/routing.py). A deployment
that already has an airflow_local_settings.py imports this function from barman_dr.routing in it.
"""

from barman_dr.routing import task_instance_mutation_hook

__all__ = ["task_instance_mutation_hook"]
