"""Shared memory: the router/worker arenas and (later) client-registered regions."""
