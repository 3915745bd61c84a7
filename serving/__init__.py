"""The server skeleton both daemons share: HTTP front (OpenAI + SGLang-native API), front <-> scheduler IPC,
metric definitions. The prefill and decode servers differ only in their scheduler."""
