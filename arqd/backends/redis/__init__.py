"""The Redis queue backend (``queue.backend = "redis"``, extra ``arqd[redis]``): ``queue`` holds
the Python, ``scripts`` every Lua script and the key layout. docs/redis.md describes both."""

from arqd.backends.redis.queue import RedisQueue

__all__ = ["RedisQueue"]
