"""What development, tests and benchmarks run around the engine, never production: the mock
provider server (``devkit.mock_provider``) and throw-away deployments (``devkit.stack``)."""
