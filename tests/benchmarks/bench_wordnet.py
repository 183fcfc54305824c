"""terrain.wordnet on the offline MiniLM with the original stability settings: 50 seeds, each
2,000 items and 200,000 pairs, path and Wu-Palmer similarity for every pair (exactly nltk's
values), correlations, bands, hypernym decay, lexicographer files and simplex CVs
(target: the 50 seeds in 5 minutes on 2 cores). Also times matching, encoding the
definitions and the whole stage, and nltk's own per-pair calls on 20,000 pairs for scale."""
import time

import numpy as np
from common import report

from terrain import wordnet as W


def main():
    t = time.perf_counter()
    res = W.analyse(None, seeds=50, n_items=2000, n_pairs=200_000, progress=False)
    total = time.perf_counter() - t
    tm = res["timings"]
    rows = [{"what": f"match {res['n_matched']} single-token items (most-frequent sense)", "seconds": tm["match_s"]},
            {"what": "encode their definitions (MiniLM, last layer, mean-pooled)", "seconds": tm["encode_s"]},
            {"what": "hypernym distance maps of all items", "seconds": tm["taxonomy_s"]},
            {"what": "50 seeds x (2,000 items, 200,000 pairs): similarities, correlations, bands, decay, "
                     "lexnames, CVs, seed-0 Mantel tests", "seconds": tm["seeds_s"], "target_s": 300.0},
            {"what": "the whole stage", "seconds": total}]
    wn = W.load_wordnet()
    syn = [wn.synset(n) for n in ("dog.n.01", "cat.n.01", "idea.n.01", "car.n.01", "tree.n.01", "music.n.01")]
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(syn), (20_000, 2))
    t = time.perf_counter()
    for i, j in pairs:
        syn[i].path_similarity(syn[j])
        syn[i].wup_similarity(syn[j])
    per_pair = (time.perf_counter() - t) / len(pairs)
    rows.append({"what": f"nltk per-pair path + wup calls, {per_pair * 1e6:.0f} us per pair: 50 x 200,000 pairs "
                         f"would take", "seconds": per_pair * 50 * 200_000})
    report("wordnet", rows)


if __name__ == "__main__":
    main()
