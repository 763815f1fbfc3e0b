"""BatchSender's core: configuration, schema, NATS topology, supervisor, workers, writers."""
