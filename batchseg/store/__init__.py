"""The store of an output folder, one module per job; each imports only those before it here:

``tables`` (the stored columns, row states, paths that are not UTF-8); ``plan`` (the resume
decisions), ``folder`` (writability, temp files, orphan masks, previous-runs/) and ``db``
(connections, schema, run row); ``checkpoint`` (record and read); ``summary`` (for status) and
``manifest`` (Parquet export and reads); ``rebuild`` (``open_run``, the opener a run uses).
"""
