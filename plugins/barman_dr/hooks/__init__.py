"""Hooks: Barman over SSH, PostgreSQL hosts over SSH, and the SSH runner they share."""
