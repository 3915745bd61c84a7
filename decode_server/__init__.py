"""The decode daemon: reserves pages, receives KV from a prefill, and decodes in a continuous batch."""
