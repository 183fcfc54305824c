"""WordNet-style similarities for many item pairs at once, equal to nltk's definitions.

A Taxonomy holds each item's hypernym distance map (every ancestor, the item's own node
included, at its shortest hypernym distance, as nltk's `_shortest_hypernym_paths`), the
min/max depth and name of every node, and whether the item's part of speech needs a
simulated root (everything but nouns, as nltk). From these it fills, for any subset of
items, the matrices

  distance  shortest path through a common ancestor (nltk's shortest_path_distance),
  path      1 / (distance + 1)                        (nltk's path_similarity),
  wup       2 depth(lcs) / (len1 + len2 + 2 depth)    (nltk's wup_similarity),

with NaN where nltk returns None. One pass over the ancestors updates the block of items
that share each one, so a 2,000-item block takes well under a second, where nltk's
per-pair calls take minutes. Nltk's own conventions are kept: the lowest common hypernym
is the common ancestor of largest min_depth, ties go to the alphabetically first name,
and the first synset of the pair wins when it is itself one (so wup can be asymmetric);
with simulate_root a fake root ('*ROOT*', one step above each synset's farthest ancestor)
joins every pair in which a non-noun takes part. Without it, pairs with no common
ancestor (adjectives, adverbs, verbs of different trees, nouns against verbs) are NaN;
with it, any two distinct adjectives score exactly 1/3 on path.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

ROOT = "*ROOT*"


@dataclass
class Taxonomy:
    names: list[str]                  # node names (synset names)
    min_depth: np.ndarray             # per node
    max_depth: np.ndarray             # per node
    item_node: np.ndarray             # node index of each item
    needs_root: np.ndarray            # per item
    maps: list[dict[int, int]]        # per item: ancestor node -> shortest hypernym distance
    parents: list[list[int]]          # per node: parent nodes
    _members: dict = field(default=None, repr=False)
    _spd: dict = field(default=None, repr=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_parents(cls, item_nodes: list[str], parents: dict[str, list[str]],
                     needs_root: list[bool] | None = None) -> "Taxonomy":
        """A taxonomy from a parent table (node -> list of parents, in order)."""
        nodes: dict[str, int] = {}
        order: list[str] = []

        def idx(n):
            if n not in nodes:
                nodes[n] = len(order)
                order.append(n)
            return nodes[n]

        maps = []
        for start in item_nodes:
            dist: dict[int, int] = {}
            queue = deque([(start, 0)])
            while queue:
                s, d = queue.popleft()
                i = idx(s)
                if i in dist:
                    continue
                dist[i] = d
                queue.extend((p, d + 1) for p in parents.get(s, []))
            maps.append(dist)
        min_d, max_d = {}, {}

        def depth(n, agg, memo):
            if n not in memo:
                ps = parents.get(n, [])
                memo[n] = 0 if not ps else 1 + agg(depth(p, agg, memo) for p in ps)
            return memo[n]

        mind = np.array([depth(n, min, min_d) for n in order], dtype=np.int64)
        maxd = np.array([depth(n, max, max_d) for n in order], dtype=np.int64)
        nr = np.zeros(len(item_nodes), bool) if needs_root is None else np.asarray(needs_root, bool)
        par = [[nodes[p] for p in parents.get(n, [])] for n in order]
        return cls(order, mind, maxd, np.array([nodes[n] for n in item_nodes]), nr, maps, par)

    @classmethod
    def from_synsets(cls, synsets) -> "Taxonomy":
        """From nltk Synsets: parents are hypernyms followed by instance hypernyms."""
        parents: dict[str, list[str]] = {}
        todo = list(synsets)
        seen = set()
        while todo:
            s = todo.pop()
            if s.name() in seen:
                continue
            seen.add(s.name())
            ps = s.hypernyms() + s.instance_hypernyms()
            parents[s.name()] = [p.name() for p in ps]
            todo.extend(ps)
        return cls.from_parents([s.name() for s in synsets], parents, [s.pos() != "n" for s in synsets])

    # ------------------------------------------------------------------ helpers
    def _index(self):
        """Per ancestor: the items holding it (ascending) and their distances to it."""
        if self._members is None:
            acc: dict[int, tuple[list, list]] = {}
            for i, m in enumerate(self.maps):
                for a, d in m.items():
                    lst = acc.setdefault(a, ([], []))
                    lst[0].append(i)
                    lst[1].append(d)
            self._members = {a: (np.array(i), np.array(d)) for a, (i, d) in acc.items()}
        return self._members

    def root_distance(self) -> np.ndarray:
        """Distance of each item to the simulated root: one more than its farthest ancestor."""
        return np.array([max(m.values()) + 1 for m in self.maps])

    def _subsumer_scores(self) -> tuple[np.ndarray, int]:
        """Integer score per node (and for the fake root, returned second): larger min_depth
        first, then the alphabetically first name, as nltk's sorted(lowest_common_hypernyms)."""
        all_names = self.names + [ROOT]
        rank = np.empty(len(all_names), np.int64)
        rank[np.argsort(np.array(all_names, dtype=object), kind="stable")] = np.arange(len(all_names))
        big = len(all_names) + 1
        md = np.append(self.min_depth, 0)
        score = md * big + (big - 1 - rank)
        return score[:-1], int(score[-1])

    def _spd_lookup(self):
        """Sorted keys item * n_nodes + ancestor -> nltk's shortest_path_distance(item, ancestor):
        the shortest path may leave the item upwards and come back down to the ancestor, so it
        is the minimum over the ancestor's own ancestors b of d_item(b) + d_ancestor(b)."""
        if self._spd is None:
            n_nodes = len(self.names)
            own: dict[int, dict[int, int]] = {}
            keys, vals = [], []
            for i, m in enumerate(self.maps):
                for a in m:
                    if a not in own:
                        own[a] = self._bfs(a)
                    keys.append(i * n_nodes + a)
                    vals.append(min(m[b] + db for b, db in own[a].items()))
            keys = np.array(keys, np.int64)
            o = np.argsort(keys)
            self._spd = (keys[o], np.array(vals, np.int64)[o])
        return self._spd

    def _bfs(self, a: int) -> dict[int, int]:
        dist: dict[int, int] = {}
        queue = deque([(a, 0)])
        while queue:
            s, d = queue.popleft()
            if s in dist:
                continue
            dist[s] = d
            queue.extend((p, d + 1) for p in self.parents[s])
        return dist

    # ------------------------------------------------------------------ similarities
    def similarities(self, subset: np.ndarray | None = None, simulate_root: bool = False) -> dict:
        """distance, path and wup matrices (float64, NaN where undefined) over `subset` items."""
        sub = np.arange(len(self.maps)) if subset is None else np.asarray(subset)
        n = len(sub)
        local = np.full(len(self.maps), -1)
        local[sub] = np.arange(n)
        members = self._index()
        score, root_score = self._subsumer_scores()
        BIG = np.iinfo(np.int64).max // 4
        dist = np.full((n, n), BIG, np.int64)
        best = np.full((n, n), -1, np.int64)           # node index of the lowest common hypernym
        best_score = np.full((n, n), -1, np.int64)
        for a in sorted(members, key=lambda a: score[a]):
            items, d = members[a]
            loc = local[items]
            keep = loc >= 0
            if not keep.any():
                continue
            loc, d = loc[keep], d[keep]
            ix = np.ix_(loc, loc)
            dist[ix] = np.minimum(dist[ix], d[:, None] + d[None, :])
            best[ix] = a                                 # ascending scores: the last writer wins
            best_score[ix] = score[a]
        nr = self.needs_root[sub]
        pair_root = (nr[:, None] | nr[None, :]) & simulate_root
        rd = self.root_distance()[sub]
        if simulate_root:
            dist = np.where(pair_root, np.minimum(dist, rd[:, None] + rd[None, :]), dist)
        use_root = pair_root & (root_score > best_score)
        best = np.where(use_root, -2, best)              # -2: the simulated root
        # nltk: "self if self in subsumers": the first synset wins when it is a common ancestor
        # of largest min_depth
        node = self.item_node[sub]
        for r in range(n):
            a = node[r]
            items, _ = members[a]
            cols = local[items]
            cols = cols[cols >= 0]
            cur = best[r, cols]
            md_cur = np.where(cur >= 0, self.min_depth[np.maximum(cur, 0)], 0)
            swap = (md_cur == self.min_depth[a]) & (cur != -1)
            best[r, cols[swap]] = a
        undefined = dist >= BIG
        distance = np.where(undefined, np.nan, dist.astype(np.float64))
        path = 1.0 / (distance + 1.0)
        wup = self._wup(sub, best, rd)
        return {"distance": distance, "path": path, "wup": wup}

    def _wup(self, sub: np.ndarray, best: np.ndarray, rd: np.ndarray) -> np.ndarray:
        n = len(sub)
        keys, vals = self._spd_lookup()
        n_nodes = len(self.names)
        real = best >= 0
        bi = np.maximum(best, 0)

        def lengths(items):                          # items: (n, n) item indices
            k = items * n_nodes + bi
            pos = np.clip(np.searchsorted(keys, k), 0, len(keys) - 1)
            ok = keys[pos] == k
            return np.where(ok, vals[pos], -1)

        rows = np.broadcast_to(sub[:, None], (n, n))
        cols = np.broadcast_to(sub[None, :], (n, n))
        l1, l2 = lengths(rows), lengths(cols)
        depth = np.where(real, self.max_depth[bi] + 1, 1).astype(np.float64)
        l1 = np.where(best == -2, rd[:, None], l1).astype(np.float64)
        l2 = np.where(best == -2, rd[None, :], l2).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            wup = 2 * depth / (l1 + l2 + 2 * depth)
        return np.where(best == -1, np.nan, wup)
