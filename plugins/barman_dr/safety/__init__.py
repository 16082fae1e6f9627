"""What keeps a DR run safe and accountable: the audit trail, server locks, ownership, the frozen-app
guard, orphan detection, app freezing, four-eyes approval.
"""
