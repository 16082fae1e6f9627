"""Reading the WAL and the data: pg_waldump, WAL selection and switches, target resolution, finding the
bad transaction, row diffs, recovery proofs.
"""
