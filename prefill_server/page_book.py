"""Which KV pages each prefill request holds, with or without the prefix cache (engine/kvcache/prefix_cache.py).

A request takes pages for its whole prompt when its prefill starts (`take`): the longest cached whole-page prefix
(locked, so nothing evicts it while the request computes on it and sends it) followed by pages of its own. Once
its last chunk is computed its whole pages go into the cache (`publish`): the tree adopts the ones it did not
have, and the request's lock moves to the deeper node. When no write can read its pages any more (its transfer
succeeded, or failed and drained: the page reaper's `safe_to_free`), `release` unlocks its cached pages and frees
its own. A request's `pages` list stays its full page table throughout: the transfer reads from it.

At least one prompt token is always computed (a fully cached prompt still needs its last token's logits), so a
match never covers the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kvcache import PageAllocator, pages_for
from engine.kvcache.prefix_cache import CacheNode, PrefixCache
from engine.request import Request


@dataclass
class _Lease:
    node: CacheNode | None  # the locked cache node (None: nothing from the cache)
    own: set[int] = field(default_factory=set)  # pages this request frees itself


class PageBook:
    def __init__(self, allocator: PageAllocator, page_size: int, prefix_cache: bool = True) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.cache = PrefixCache(allocator, page_size) if prefix_cache else None
        self._leases: dict[Request, _Lease] = {}

    def _cacheable(self, req: Request) -> list[int]:
        """The prompt prefix a match may cover: whole pages, leaving at least one token to compute."""
        n = (len(req.prompt_ids) - 1) // self.page_size * self.page_size
        return req.prompt_ids[:n]

    def cached_tokens(self, req: Request) -> int:
        """Tokens of `req`'s prompt the cache would give it now (planning only: nothing is taken)."""
        return self.cache.match_len(self._cacheable(req)) if self.cache else 0

    def take(self, req: Request) -> bool:
        """Pages for `req`'s whole prompt, the cached prefix first; sets `req.pages` and `req.num_cached` (the
        tokens whose KV they already hold). False, holding nothing, when the pool cannot give them."""
        need = pages_for(len(req.prompt_ids), self.page_size)
        if self.cache is None:
            pages = self.allocator.allocate(need)
            if pages is None:
                return False
            req.pages, req.num_cached = pages, 0
            self._leases[req] = _Lease(None, set(pages))
            return True
        cached, node = self.cache.match(self._cacheable(req))
        self.cache.lock(node)  # before allocating: the eviction that makes room must not take these
        own = self.cache.allocate(need - len(cached))
        if own is None:
            self.cache.unlock(node)
            return False
        req.pages, req.num_cached = cached + own, len(cached) * self.page_size
        self._leases[req] = _Lease(node, set(own))
        return True

    def publish(self, req: Request) -> None:
        """`req`'s whole prompt is computed: its whole pages become reusable by later requests."""
        lease = self._leases.get(req)
        if self.cache is None or lease is None:
            return
        node, adopted = self.cache.insert(req.prompt_ids, req.pages)
        self.cache.lock(node)
        if lease.node is not None:
            self.cache.unlock(lease.node)
        lease.node = node
        lease.own -= adopted

    def release(self, req: Request) -> None:
        """No write reads `req`'s pages any more: unlock its cached ones, free its own."""
        lease = self._leases.pop(req, None)
        if lease is not None:
            if lease.node is not None and self.cache is not None:
                self.cache.unlock(lease.node)
            self.allocator.free(sorted(lease.own))
        req.pages = []

    # -- state for stats and metrics ------------------------------------------------------------------------

    @property
    def cache_pages(self) -> int:
        return self.cache.num_pages if self.cache else 0

    @property
    def pages_in_use(self) -> int:
        """Pages that cannot be handed out now: held by requests (own or locked in the cache). Cached pages
        nobody holds are reusable, so they are not counted."""
        evictable = self.cache.evictable_pages if self.cache else 0
        return self.allocator.num_pages - self.allocator.num_free - evictable

    def __len__(self) -> int:
        return len(self._leases)
