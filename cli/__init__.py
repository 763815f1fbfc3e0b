"""The ``batchsender`` command line: every process and operator task (``cli.main``) and
the file upload client of ``batchsender send`` (``cli.send``)."""
