"""Real processes on loopback for end-to-end tests and benchmarks alike (neither imports the other).

`stack` starts the `pdserve prefill`/`decode`/`router` daemons (and optionally sglang-router);
`peer_proc` drives a `transfer_peer.py` process, one side of a KV transfer over a real engine, by
JSON-line commands. Not installed with pdserve: tests and benchmarks run from a checkout.
"""
