"""hq-server: the stateless aiohttp queue server. All state lives in Redis."""
