"""Entry point Airflow's plugin manager finds in the plugins folder.

The library itself (`barman_dr/`) is listed in .airflowignore: the plugin manager would
otherwise import each of its modules as a standalone file.
"""

from barman_dr.plugin import BarmanDrPlugin

__all__ = ["BarmanDrPlugin"]
