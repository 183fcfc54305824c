"""Make WordNet 3.0 readable by nltk without downloading: nltk's own corpus if present,
otherwise an nltk data folder built from Debian's wordnet-base + wordnet-sense-index files.

    python scripts/setup_wordnet.py [--source /usr/share/wordnet] [--target .venv/nltk_data]

The default target, <sys.prefix>/nltk_data, is on nltk's search path for this virtual
environment, so no NLTK_DATA variable is needed. Exits 0 when WordNet loads afterwards.
"""
import argparse
import os
import shutil
import sys

# The 45 lexicographer files of WordNet 3.0 (lexnames(5)): number, name, syntactic category.
LEXNAMES = """adj.all 3
adj.pert 3
adv.all 4
noun.Tops 1
noun.act 1
noun.animal 1
noun.artifact 1
noun.attribute 1
noun.body 1
noun.cognition 1
noun.communication 1
noun.event 1
noun.feeling 1
noun.food 1
noun.group 1
noun.location 1
noun.motive 1
noun.object 1
noun.person 1
noun.phenomenon 1
noun.plant 1
noun.possession 1
noun.process 1
noun.quantity 1
noun.relation 1
noun.shape 1
noun.state 1
noun.substance 1
noun.time 1
verb.body 2
verb.change 2
verb.cognition 2
verb.communication 2
verb.competition 2
verb.consumption 2
verb.contact 2
verb.creation 2
verb.emotion 2
verb.motion 2
verb.perception 2
verb.possession 2
verb.social 2
verb.stative 2
verb.weather 2
adj.ppl 3"""

NEEDED = ["data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj",
          "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc"]
OPTIONAL = ["index.sense", "cntlist.rev", "cntlist"]


def wordnet_loads() -> bool:
    try:
        from nltk.corpus import wordnet as wn
        return wn.synset("dog.n.01").name() == "dog.n.01"
    except Exception:
        return False


def build(source: str, target: str) -> str:
    missing = [f for f in NEEDED if not os.path.exists(os.path.join(source, f))]
    if missing:
        raise FileNotFoundError(
            f"WordNet files {missing} not found in {source}; install Debian's wordnet-base and "
            f"wordnet-sense-index (apt-get install wordnet-base wordnet-sense-index) or nltk's "
            f"wordnet corpus")
    folder = os.path.join(target, "corpora", "wordnet")
    os.makedirs(folder, exist_ok=True)
    for name in NEEDED + OPTIONAL:
        src, dst = os.path.join(source, name), os.path.join(folder, name)
        if os.path.islink(dst):  # nltk refuses links that resolve outside its data root
            os.remove(dst)
        if os.path.exists(src) and not os.path.exists(dst):
            shutil.copyfile(src, dst)
    with open(os.path.join(folder, "lexnames"), "w") as f:
        for i, line in enumerate(LEXNAMES.splitlines()):
            name, pos = line.split()
            f.write(f"{i:02d}\t{name}\t{pos}\n")
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="/usr/share/wordnet")
    p.add_argument("--target", default=os.path.join(sys.prefix, "nltk_data"))
    args = p.parse_args()
    if wordnet_loads():
        print("WordNet: nltk already reads a WordNet corpus")
        return 0
    try:
        folder = build(args.source, args.target)
    except FileNotFoundError as e:
        print(f"WordNet: {e}", file=sys.stderr)
        return 1
    # check in a fresh interpreter: nltk caches its lazy corpus readers
    import subprocess
    env = dict(os.environ)
    env["NLTK_DATA"] = os.pathsep.join(filter(None, [args.target, env.get("NLTK_DATA")]))
    code = "from nltk.corpus import wordnet as wn; assert wn.synset('dog.n.01').lexname() == 'noun.animal'"
    if subprocess.run([sys.executable, "-c", code], env=env).returncode != 0:
        print(f"WordNet: built {folder} but nltk cannot read it", file=sys.stderr)
        return 1
    print(f"WordNet: built {folder} from {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
