"""Operators: one per DR runbook step, each audited."""
