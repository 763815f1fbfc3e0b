"""Provider adapters: one module per e-mail provider. Imports nothing else of the project."""
