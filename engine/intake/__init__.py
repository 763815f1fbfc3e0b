"""Intake: a customer's batch, from a request body to stored recipients and queued chunks.

The same path serves REST (JSON body, streamed NDJSON or CSV) and NATS intake:

- ``fields``: the batch fields validated into a ``BatchSpec``;
- ``decoders``: the body as blocks of recipient rows (JSON, NDJSON, CSV);
- ``copier``: each row validated and COPYed into PostgreSQL;
- ``store``: create a batch, or add recipients to a draft, in one transaction;
- ``from_nats``: the ``intake`` consumer, batches published to NATS.
"""
