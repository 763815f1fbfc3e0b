"""The thin aiohttp layer over the engine: parse, authenticate, validate, call, answer."""
