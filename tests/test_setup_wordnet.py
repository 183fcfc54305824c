"""The setup makes WordNet 3.0 readable by nltk offline (scripts/setup_wordnet.py)."""
import os

import pytest


def wordnet():
    try:
        from nltk.corpus import wordnet as wn
        wn.ensure_loaded()
        return wn
    except LookupError:
        if not os.path.exists("/usr/share/wordnet/data.noun"):
            pytest.skip("no WordNet on this machine (no nltk corpus, no Debian wordnet-base)")
        raise


def test_wordnet_30_known_values():
    wn = wordnet()
    assert wn.get_version() == "3.0"
    dog, cat = wn.synset("dog.n.01"), wn.synset("cat.n.01")
    assert dog.path_similarity(cat) == pytest.approx(0.2)
    assert dog.wup_similarity(cat) == pytest.approx(6 / 7)
    assert dog.lexname() == "noun.animal"  # needs the lexnames file the setup writes
    assert sum(1 for _ in wn.all_synsets("n")) == 82115
    assert wn.lemma("dog.n.01.dog").count() > 0  # sense counts (cntlist.rev)
    assert wn.lemma_from_key("dog%1:05:00::").synset() == dog  # index.sense
