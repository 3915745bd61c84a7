"""A radix tree of computed KV pages keyed by page-aligned token prefixes, for reuse across requests.

Keys are whole pages: a node's edge holds `k * page_size` tokens and the k pages whose KV they produced, so any
match is a run of whole pages that a request can put at the head of its page table and extend from. The last
partial page of a prompt is never cached (its remaining slots would be written by the request that owns it).

Ownership. A page is either the tree's (inserted once computed) or a request's private page. A request that uses
tree pages holds a *lock* on the deepest node it uses: every node on the path to the root counts it in `refs`, and a
node with refs > 0 is never evicted. The holder unlocks only once nothing reads its pages any more — on a prefill
server that is when the KV transfer of those pages ended (`safe_to_free`), so no write can read a page after it was
evicted and handed to another request.

Eviction is LRU over unreferenced leaves (evicting a leaf can make its parent a leaf): `allocate` evicts just enough
when the allocator runs short. "LRU" runs on a logical clock, not wall time, so tensor-parallel ranks that see the
same requests in the same order evict the same pages.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from engine.kvcache.allocator import PageAllocator

__all__ = ["CacheNode", "PrefixCache"]


@dataclass(eq=False)
class CacheNode:
    tokens: tuple[int, ...]  # this edge's tokens: a whole number of pages
    pages: list[int]
    parent: CacheNode | None
    children: dict[tuple[int, ...], CacheNode] = field(default_factory=dict)  # by the child's first page of tokens
    refs: int = 0
    last_used: int = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.root = CacheNode((), [], None, refs=1)  # the root is never evicted
        self._clock = itertools.count(1)
        self.num_pages = 0  # pages owned by the tree
        self.locked_pages = 0  # of those, pages on a path some request holds
        self.evicted = 0  # pages evicted over the cache's life

    # -- lookups and locks ------------------------------------------------------------------------------

    def match(self, tokens: list[int]) -> tuple[list[int], CacheNode]:
        """The pages of the longest cached whole-page prefix of `tokens`, and the node where it ends (lock it
        before using the pages). Splits a node when the match ends inside its edge."""
        ps = self.page_size
        node, pages, i = self.root, [], 0
        now = next(self._clock)
        node.last_used = now
        while len(tokens) - i >= ps:
            child = node.children.get(tuple(tokens[i : i + ps]))
            if child is None:
                break
            n = self._common_pages(child.tokens, tokens, i)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_used = now
            pages.extend(child.pages)
            i += len(child.tokens)
            node = child
        return pages, node

    def match_len(self, tokens: list[int]) -> int:
        """How many tokens of `tokens` `match` would find, without touching the tree (for planning a batch)."""
        ps = self.page_size
        node, i = self.root, 0
        while len(tokens) - i >= ps:
            child = node.children.get(tuple(tokens[i : i + ps]))
            if child is None:
                break
            n = self._common_pages(child.tokens, tokens, i)
            i += n * ps
            if n < len(child.pages):
                break
            node = child
        return i

    def lock(self, node: CacheNode) -> None:
        while node is not None and node is not self.root:
            if node.refs == 0:
                self.locked_pages += len(node.pages)
            node.refs += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: CacheNode) -> None:
        while node is not None and node is not self.root:
            if node.refs <= 0:
                raise ValueError("prefix cache: unlock of a node that is not locked")
            node.refs -= 1
            if node.refs == 0:
                self.locked_pages -= len(node.pages)
            node = node.parent  # type: ignore[assignment]

    @property
    def evictable_pages(self) -> int:
        return self.num_pages - self.locked_pages

    # -- insertion ----------------------------------------------------------------------------------------

    def insert(self, tokens: list[int], pages: list[int]) -> tuple[CacheNode, set[int]]:
        """Add the whole pages of `tokens` (KV in `pages`, one per page of tokens; a trailing partial page is
        ignored). Where the tree already holds a prefix (this request matched it, or another computed it
        meanwhile) its own pages stay. Returns the node where the inserted prefix ends and the pages of `pages`
        the tree took over; the caller still owns the rest (its duplicates) and frees them when done."""
        ps = self.page_size
        n_pages = min(len(tokens) // ps, len(pages))
        node, i, adopted = self.root, 0, set()
        now = next(self._clock)
        while i < n_pages * ps:
            child = node.children.get(tuple(tokens[i : i + ps]))
            if child is None:
                key = tuple(tokens[i : n_pages * ps])
                new = CacheNode(key, list(pages[i // ps : n_pages]), node, last_used=now)
                node.children[key[:ps]] = new
                adopted.update(new.pages)
                self.num_pages += len(new.pages)
                return new, adopted
            n = self._common_pages(child.tokens, tokens[: n_pages * ps], i)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_used = now
            i += len(child.tokens)
            node = child
        return node, adopted

    # -- eviction and allocation -------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` unreferenced pages if there are that many, least recently used first;
        returns how many were freed."""
        leaves = [(n.last_used, id(n), n) for n in self._nodes() if n.is_leaf and n.refs == 0 and n is not self.root]
        heapq.heapify(leaves)
        freed = 0
        while leaves and freed < num_pages:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            assert parent is not None
            del parent.children[node.tokens[: self.page_size]]
            self.allocator.free(node.pages)
            self.num_pages -= len(node.pages)
            freed += len(node.pages)
            self.evicted += len(node.pages)
            if parent is not self.root and parent.is_leaf and parent.refs == 0:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))
        return freed

    def allocate(self, num_pages: int) -> list[int] | None:
        """`num_pages` pages from the allocator, evicting cached pages if it is short; None if even that fails."""
        pages = self.allocator.allocate(num_pages)
        if pages is None and num_pages - self.allocator.num_free <= self.evictable_pages:
            self.evict(num_pages - self.allocator.num_free)
            pages = self.allocator.allocate(num_pages)
        return pages

    def clear(self) -> int:
        """Evict everything unreferenced (tests, and a server asked to flush its cache)."""
        return self.evict(self.num_pages)

    # -- internals ----------------------------------------------------------------------------------------

    def _common_pages(self, edge: tuple[int, ...], tokens: list[int], start: int) -> int:
        """Whole pages of `edge` equal to `tokens[start:]` (at least 1: the caller found the child by its first)."""
        ps = self.page_size
        n = 1
        while (n + 1) * ps <= len(edge) and start + (n + 1) * ps <= len(tokens):
            if edge[n * ps : (n + 1) * ps] != tuple(tokens[start + n * ps : start + (n + 1) * ps]):
                break
            n += 1
        return n

    def _split(self, node: CacheNode, n_pages: int) -> CacheNode:
        """Cut `node`'s edge after `n_pages` pages; returns the new upper node (same refs: a lock on the lower
        node covers the upper one too, being on its path)."""
        ps = self.page_size
        parent = node.parent
        assert parent is not None
        upper = CacheNode(node.tokens[: n_pages * ps], node.pages[:n_pages], parent, refs=node.refs)
        upper.last_used = node.last_used
        parent.children[upper.tokens[:ps]] = upper
        node.tokens, node.pages, node.parent = node.tokens[n_pages * ps :], node.pages[n_pages:], upper
        upper.children[node.tokens[:ps]] = node
        return upper

    def _nodes(self) -> list[CacheNode]:
        out, todo = [], [self.root]
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(node.children.values())
        return out
