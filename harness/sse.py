"""Reading a server-sent-event stream the way the SSE spec splits it: on "\n" (and "\r"), never on the other
characters `str.splitlines` (and so httpx's `aiter_lines`) treats as line breaks. Generated text may hold U+0085,
U+2028 or U+2029 raw inside a JSON string (JSON does not escape them), which would cut an event in two."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx


async def sse_data(resp: httpx.Response) -> AsyncIterator[str]:
    """The payload of each `data:` line of `resp`, `[DONE]` included, in order."""
    buf = ""
    async for text in resp.aiter_text():
        buf += text.replace("\r\n", "\n").replace("\r", "\n")
        *lines, buf = buf.split("\n")
        for line in lines:
            if line.startswith("data: "):
                yield line[6:]
    if buf.startswith("data: "):
        yield buf[6:]
