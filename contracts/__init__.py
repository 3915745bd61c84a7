"""What crosses a process boundary, defined once, importing no other pdserve package.

`codec` (typed, versioned msgpack records for every ZMQ channel), `errors` (the OpenAI error body),
`pd` (PD request rules: room range, default bootstrap port, what counts as a batch, the rid rule) and
`metrics` (every Prometheus metric and its label values). `engine`, `transfer`, `serving`, both servers
and the router all build on these; this package depends only on the standard library, msgpack and
prometheus_client, so the router can use it without pulling in torch.
"""
