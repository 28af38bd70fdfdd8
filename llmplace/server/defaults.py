"""The server's defaults that both the command line (server/__init__, read by `llmplace --help` without the
native library) and the server (app.py) use."""

SLOTS = 4         # sequences decoded together by default (llama-server's default too); 1: the serial Llama path
MAX_QUEUE = 128   # requests that may wait for a slot (or for the Llama) before the next one gets 429
