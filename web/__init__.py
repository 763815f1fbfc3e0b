"""The web dashboard (``batchsender web``, port 3000): pages over the engine functions the
REST API calls, for the people who run batches."""
