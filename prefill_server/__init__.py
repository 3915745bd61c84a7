"""The prefill daemon: waits for decode's transfer info, runs the prompt, pushes its KV to the decode side."""
