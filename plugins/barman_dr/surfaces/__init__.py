"""The surfaces people and tools touch: the DR page, the CLI and its REST client, notifications,
metrics, run notes, RTO deadline alerts.
"""
