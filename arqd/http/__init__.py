"""The HTTP face of arqd: the aiohttp control API (``server``) and ``arqd.HttpClient``."""
