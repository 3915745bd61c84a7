"""An approximate, multi-tenant radix tree over request text: which server ("tenant") recently received which prompt
prefixes, so the cache-aware policy (`router.cache_aware`) can send a prompt where its prefix is likely still cached.

The tree is over characters, not tokens: the router does not tokenize to route, and a shared text prefix is a shared
token prefix up to the last token or so. It is approximate on purpose: it records what the router sent, not what a
server still holds (a server evicts on its own schedule and tells nobody), and each tenant's share is bounded by
`max_chars` characters, least recently used leaves evicted first, which stands in for the server's own LRU cache.

Every non-root node is owned by at least one tenant, and a node's tenants include its children's (a tenant that
received a text received every prefix of it); a tenant's last access on a node is never older than on its children.
Those two rules make eviction leaf-first and `match` a single walk down. Pure and single-threaded (asyncio), no I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["EVICT_TO", "Match", "PrefixTree"]

# A tenant over its bound is trimmed to this fraction of it, so the O(its nodes) eviction pass runs once per many
# inserts rather than on every one.
EVICT_TO = 0.9


class _Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None, tenants: dict[str, int] | None = None) -> None:
        self.text = text  # the edge from the parent
        self.parent = parent
        self.children: dict[str, _Node] = {}  # by the first character of their edge
        self.tenants: dict[str, int] = tenants if tenants is not None else {}  # tenant -> last access (logical)


@dataclass(frozen=True)
class Match:
    """The longest prefix of a text that some of the asked-about tenants received: its length in characters, and
    those tenants (each with its last access: larger is more recent). `chars` 0 and no tenants: nothing matched."""

    chars: int
    tenants: dict[str, int]


def common_prefix(edge: str, text: str, pos: int) -> int:
    """How many leading characters of `edge` equal `text[pos:]`'s. Comparisons run in C (`startswith`): a binary
    search over prefix lengths, since a character loop in Python would cost ~50 ns a character of every prompt."""
    if text.startswith(edge, pos):
        return len(edge)
    lo, hi = 0, min(len(edge), len(text) - pos)  # lo matches; hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], pos):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """`insert(text, tenant)` records that `tenant` received `text`; `match(text, tenants)` finds the longest prefix
    of `text` that one of `tenants` received. Each tenant holds at most `max_chars` characters of edges."""

    def __init__(self, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.max_chars = max_chars
        self._root = _Node("", None)
        self._sizes: dict[str, int] = {}  # tenant -> characters of the edges it owns
        self._clock = 0  # logical time: deterministic, and only the order matters

    def size(self, tenant: str) -> int:
        """Characters of text held for `tenant` (shared prefixes counted once per tenant)."""
        return self._sizes.get(tenant, 0)

    @property
    def tenants(self) -> list[str]:
        return [t for t, n in self._sizes.items() if n > 0]

    def match(self, text: str, tenants: Collection[str] | None = None) -> Match:
        """The longest prefix of `text` received by one of `tenants` (every tenant when None). Servers that are down
        or failed in this request are left out by the caller, so their history never wins a match."""
        node, pos = self._root, 0
        best = Match(0, {})
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            owners = {t: at for t, at in child.tenants.items() if tenants is None or t in tenants}
            if not owners:
                break
            n = common_prefix(child.text, text, pos)
            pos += n
            best = Match(pos, owners)  # the owners saw the whole edge, so the part that matched too
            if n < len(child.text):
                break
            node = child
        return best

    def insert(self, text: str, tenant: str) -> None:
        """Records that `tenant` just received `text` (every node on its path becomes its most recent), then trims the
        tenant to its bound if it passed it."""
        self._clock += 1
        now = self._clock
        node, pos = self._root, 0
        size = self._sizes.get(tenant, 0)
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node, {tenant: now})
                node.children[text[pos]] = leaf
                size += len(leaf.text)
                break
            n = common_prefix(child.text, text, pos)
            if n < len(child.text):
                child = self._split(child, n)
            if tenant not in child.tenants:
                size += len(child.text)
            child.tenants[tenant] = now
            pos += n
            node = child
        self._sizes[tenant] = size
        if size > self.max_chars:
            self._evict(tenant, int(self.max_chars * EVICT_TO))

    @staticmethod
    def _split(node: _Node, n: int) -> _Node:
        """Cuts `node`'s edge after `n` characters (0 < n < len): a new parent holds the first part, owned by the same
        tenants at the same times (no tenant's size changes)."""
        parent = node.parent
        assert parent is not None and 0 < n < len(node.text)
        mid = _Node(node.text[:n], parent, dict(node.tenants))
        parent.children[mid.text[0]] = mid
        node.text = node.text[n:]
        node.parent = mid
        mid.children[node.text[0]] = node
        return mid

    def _owned(self, tenant: str) -> list[_Node]:
        """Every node `tenant` owns (they form a subtree under the root: ownership is closed under prefixes)."""
        out: list[_Node] = []
        todo = [c for c in self._root.children.values() if tenant in c.tenants]
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(c for c in node.children.values() if tenant in c.tenants)
        return out

    @staticmethod
    def _is_leaf_of(node: _Node, tenant: str) -> bool:
        return not any(tenant in c.tenants for c in node.children.values())

    def _drop(self, node: _Node, tenant: str) -> None:
        """Takes `tenant` off `node` (one of its leaves) and the node out of the tree when nobody owns it any more."""
        del node.tenants[tenant]
        self._sizes[tenant] -= len(node.text)
        if not node.tenants:
            # no owner left: its children had no owner either (theirs are a subset), so it has none
            assert node.parent is not None and not node.children
            del node.parent.children[node.text[0]]

    def _evict(self, tenant: str, target: int) -> None:
        """Drops `tenant`'s least recently used leaves until it holds at most `target` characters. A parent whose
        last owned child went becomes a leaf itself; it is never older than that child, so one heap serves."""
        heap = [(n.tenants[tenant], id(n), n) for n in self._owned(tenant) if self._is_leaf_of(n, tenant)]
        heapq.heapify(heap)
        while heap and self._sizes[tenant] > target:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._drop(node, tenant)
            if parent is not None and parent is not self._root and self._is_leaf_of(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))
        if self._sizes[tenant] == 0:
            del self._sizes[tenant]

    def remove_tenant(self, tenant: str) -> None:
        """Forgets everything `tenant` received (a server taken out of the configuration)."""
        nodes = self._owned(tenant)
        for node in reversed(nodes):  # children come after their parents in `_owned`: leaves first
            self._drop(node, tenant)
        self._sizes.pop(tenant, None)

    def node_count(self) -> int:
        """Nodes below the root (tests check that eviction frees them)."""
        count, todo = 0, list(self._root.children.values())
        while todo:
            node = todo.pop()
            count += 1
            todo.extend(node.children.values())
        return count
