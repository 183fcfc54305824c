"""Windows, patch masks and leak-free splits over a circles series (data.npz + config.json).

The series is cut into three contiguous time blocks, train | gap | validation | gap | test,
with gaps of at least one window, so no window of one block ever touches a step scored in
another. Windows are taken inside a block only.

Masks are contiguous patches (fixed size, or sizes drawn from [patch_min, patch_max]) that
cover exactly round(mask_ratio * seq_len) steps, each step masked with probability exactly
mask_ratio. Each window's mask is drawn from its own
generator keyed by (mask seed, epoch, window index): fresh every epoch for training, fixed
for evaluation, identical across DataLoader workers and reruns.

This module only needs numpy; torch's DataLoader turns the returned arrays into tensors.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from cliargs import Parser

REQUIRED_ARRAYS = ("X",)  # "states" (labels) is optional: a user's own series may have none


# ----------------------------------------------------------------------------- loading

@dataclass
class Series:
    X: np.ndarray            # (T, D) float32 observations
    states: np.ndarray       # (T,) circle index or label (zeros when the series has no labels)
    thetas: np.ndarray | None
    signal: np.ndarray | None
    config: dict
    data_dir: str
    extra: dict = field(default_factory=dict)  # the other arrays of data.npz (planes, radii, ...)
    has_labels: bool = True

    @property
    def n_steps(self) -> int:
        return len(self.X)

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    @property
    def n_states(self) -> int:
        """Number of labels (circles); 0 for a series without labels, which figures read as
        "no state strip" and analyses as "no label-based metrics"."""
        if not self.has_labels:
            return 0
        return int(self.config.get("n_circles", int(self.states.max()) + 1))

    @property
    def noise_var(self) -> float | None:
        """Per-dimension noise variance: the MSE floor of any predictor of the observations."""
        if "noise_var" in self.config:
            return float(self.config["noise_var"])
        if "noise_std" in self.config:
            return float(self.config["noise_std"]) ** 2
        return None


def load_series(data_dir: str) -> Series:
    """Load data.npz + config.json, with one clear error for each way it can be wrong."""
    npz = os.path.join(data_dir, "data.npz")
    cfg_path = os.path.join(data_dir, "config.json")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data directory {data_dir!r} does not exist; generate it with "
            f"`python markov_circles_timeseries.py --out-dir {data_dir}`")
    if not os.path.exists(npz):
        raise FileNotFoundError(
            f"{npz} not found; generate the data with `python markov_circles_timeseries.py --out-dir {data_dir}` "
            f"or convert a recorded series with `python dataset.py FILE --out-dir {data_dir}`")
    try:
        with np.load(npz) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # corrupt zip, truncated file
        raise ValueError(f"{npz} is not a readable .npz file ({e}); regenerate it") from e
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"{npz} lacks the arrays {missing}; write data folders with markov_circles_timeseries.py "
                         f"or `python dataset.py FILE --out-dir DIR`")
    X = arrays["X"]
    has_labels = "states" in arrays
    states = arrays["states"] if has_labels else np.zeros(len(X) if X.ndim else 0, np.int64)
    if X.ndim != 2 or states.shape != (len(X),):
        raise ValueError(f"{npz}: X must be (T, D) and states (T,), got {X.shape} and {states.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{npz}: X contains NaN or infinite values")
    config = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path} is not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object of generator "
                             f"parameters; regenerate the data folder or remove config.json")
    return Series(X=X.astype(np.float32, copy=False), states=states.astype(np.int64, copy=False),
                  thetas=arrays.get("thetas"), signal=arrays.get("signal"), config=config,
                  data_dir=data_dir, has_labels=has_labels,
                  extra={k: v for k, v in arrays.items() if k not in ("X", "states", "thetas", "signal")})


# ----------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class Splits:
    """Half-open [start, end) time blocks."""
    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]
    gap: int

    def as_dict(self) -> dict:
        return asdict(self)


def time_splits(n_steps: int, seq_len: int, val_frac: float = 0.1, test_frac: float = 0.1,
                gap: int | None = None) -> Splits:
    """train | gap | val | gap | test as contiguous blocks; the gap defaults to one window."""
    gap = seq_len if gap is None else gap
    if gap < 0:
        raise ValueError("gap must be >= 0")
    if not (0 < val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"bad split fractions val={val_frac}, test={test_frac}")
    usable = n_steps - 2 * gap
    n_test = int(round(usable * test_frac))
    n_val = int(round(usable * val_frac))
    n_train = usable - n_val - n_test
    blocks = {"train": n_train, "validation": n_val}
    if test_frac > 0:
        blocks["test"] = n_test
    short = {k: v for k, v in blocks.items() if v < seq_len}
    if short:
        raise ValueError(
            f"a window of {seq_len} steps does not fit in the {', '.join(f'{k} block ({v} steps)' for k, v in short.items())} "
            f"of a {n_steps}-step series (gaps of {gap}); use a shorter --seq-len or a longer series")
    train = (0, n_train)
    val = (n_train + gap, n_train + gap + n_val)
    test = (val[1] + gap, n_steps) if test_frac > 0 else (n_steps, n_steps)
    return Splits(train=train, val=val, test=test, gap=gap)


def window_starts(block: tuple[int, int], seq_len: int, stride: int, cover_end: bool = False) -> np.ndarray:
    """Start indices of the windows [s, s + seq_len) inside a block.

    With cover_end, one more window flush with the block's end is added when the stride
    does not land there, so every step of the block lies in some window.
    """
    start, end = block
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if end - start < seq_len:
        raise ValueError(f"windows of {seq_len} steps do not fit in a block of {end - start} steps")
    starts = np.arange(start, end - seq_len + 1, stride)
    if cover_end and starts[-1] != end - seq_len:
        starts = np.append(starts, end - seq_len)
    return starts


# ----------------------------------------------------------------------------- masks

@dataclass(frozen=True)
class MaskConfig:
    ratio: float = 0.15
    patch_size: int = 16                  # fixed size when patch_min/max are not given
    patch_min: int | None = None
    patch_max: int | None = None

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError(f"mask ratio must be in (0, 1), got {self.ratio}")
        if (self.patch_min is None) != (self.patch_max is None):
            raise ValueError("give both --mask-patch-min and --mask-patch-max, or neither")
        if self.patch_min is not None and not 1 <= self.patch_min <= self.patch_max:
            raise ValueError(f"need 1 <= mask-patch-min <= mask-patch-max, got {self.patch_min}, {self.patch_max}")
        if self.patch_size < 1:
            raise ValueError("mask patch size must be >= 1")

    @property
    def stochastic(self) -> bool:
        return self.patch_min is not None

    def n_masked(self, seq_len: int) -> int:
        return max(1, int(round(self.ratio * seq_len)))


def patch_sizes(total: int, cfg: MaskConfig, rng: np.random.Generator) -> list[int]:
    """Patch lengths summing exactly to `total`.

    Sizes are drawn (or fixed) until they reach the total; the last one is cut to fit, and
    when the cut leaves it shorter than the minimum size it is spread over the others.
    """
    lo, hi = (cfg.patch_min, cfg.patch_max) if cfg.stochastic else (cfg.patch_size, cfg.patch_size)
    sizes: list[int] = []
    acc = 0
    while acc < total:
        s = int(rng.integers(lo, hi + 1))
        s = min(s, total - acc)
        sizes.append(s)
        acc += s
    if len(sizes) > 1 and sizes[-1] < lo:
        extra = sizes.pop()
        for i in range(extra):
            sizes[i % len(sizes)] += 1
    return sizes


def patch_mask(seq_len: int, cfg: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of length seq_len with exactly cfg.n_masked(seq_len) True steps in
    contiguous patches.

    The patches are laid out on the window taken as a circle, separated by random gaps of
    at least one step, and the layout is rotated by a uniform offset. Every step is then
    masked with probability exactly mask_ratio (a linear layout starves the window's
    edges); the patch that crosses the window's end is cut in two, like a patch that
    extends past the window.
    """
    total = min(cfg.n_masked(seq_len), seq_len - 1)
    sizes = patch_sizes(total, cfg, rng)
    rng.shuffle(sizes)
    while len(sizes) > seq_len - total:  # too many patches to separate: merge the last two
        last = sizes.pop()
        sizes[-1] += last
    k = len(sizes)
    free = seq_len - total - k  # unmasked steps beyond one separator after each patch
    # uniform composition of `free` spare steps into k gaps (stars and bars)
    cuts = np.sort(rng.choice(free + k - 1, size=k - 1, replace=False)) - np.arange(k - 1)
    extra = np.diff(np.concatenate(([0], cuts, [free])))
    mask = np.zeros(seq_len, dtype=bool)
    pos = 0
    for s, g in zip(sizes, extra):
        mask[pos:pos + s] = True
        pos += s + 1 + int(g)
    return np.roll(mask, int(rng.integers(seq_len)))


# ----------------------------------------------------------------------------- datasets

class WindowDataset:
    """Map-style dataset of windows: item i -> (x (L, D) float32, states (L,) int64, mask (L,) bool).

    fixed=True: the mask of window i never changes (evaluation). fixed=False: masks depend
    on the epoch set with set_epoch (training). mask_cfg=None gives all-False masks.
    eval_warmup: steps of context a causal evaluation skips at the start of each window.
    signal: the noise-free series (T, D) when the generator wrote it, for signal MSEs.
    """

    def __init__(self, X: np.ndarray, states: np.ndarray, starts: np.ndarray, seq_len: int,
                 mask_cfg: MaskConfig | None = None, mask_seed: int = 0, fixed: bool = True, eval_warmup: int = 0,
                 signal: np.ndarray | None = None):
        self.X, self.states, self.starts, self.signal = X, states, np.asarray(starts), signal
        self.seq_len, self.mask_cfg, self.mask_seed, self.fixed = seq_len, mask_cfg, mask_seed, fixed
        self.eval_warmup = eval_warmup
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.starts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def mask(self, i: int) -> np.ndarray:
        if self.mask_cfg is None:
            return np.zeros(self.seq_len, dtype=bool)
        key = [self.mask_seed, i] if self.fixed else [self.mask_seed, self.epoch, i]
        return patch_mask(self.seq_len, self.mask_cfg, np.random.default_rng(key))

    def signal_windows(self, i0: int, i1: int) -> np.ndarray | None:
        """The noise-free windows i0..i1-1 (B, L, D), or None without a signal."""
        if self.signal is None:
            return None
        return self.signal[self.starts[i0:i1, None] + np.arange(self.seq_len)]

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        e = s + self.seq_len
        return self.X[s:e], self.states[s:e], self.mask(i)


def build_datasets(series: Series, seq_len: int, stride: int, mask_cfg: MaskConfig | None,
                   seed: int, val_frac: float = 0.1, test_frac: float = 0.1,
                   gap: int | None = None, eval_stride: int | None = None):
    """Train / validation / test WindowDatasets over leak-free time blocks.

    Evaluation windows tile their block (stride seq_len by default, plus one flush with the
    end), so each scored step is counted about once; their masks are fixed by the seed.
    """
    if seq_len > series.n_steps:
        raise ValueError(f"--seq-len {seq_len} is longer than the series ({series.n_steps} steps)")
    splits = time_splits(series.n_steps, seq_len, val_frac, test_frac, gap)
    eval_stride = eval_stride or seq_len
    ss = np.random.SeedSequence(seed).spawn(3)
    mseed = [int(s.generate_state(1)[0]) for s in ss]
    sig = series.signal
    train = WindowDataset(series.X, series.states, window_starts(splits.train, seq_len, stride),
                          seq_len, mask_cfg, mseed[0], fixed=False, signal=sig)
    val = WindowDataset(series.X, series.states, window_starts(splits.val, seq_len, eval_stride, True),
                        seq_len, mask_cfg, mseed[1], fixed=True, signal=sig)
    test = None
    if splits.test[1] > splits.test[0]:
        test = WindowDataset(series.X, series.states, window_starts(splits.test, seq_len, eval_stride, True),
                             seq_len, mask_cfg, mseed[2], fixed=True, signal=sig)
    return {"train": train, "val": val, "test": test, "splits": splits}


TRAIN_EVAL_MASK_STREAM = 7  # the training windows scored each epoch draw their fixed masks from mask_seed + this


def train_eval_windows(ds: dict) -> WindowDataset:
    """As many training windows as the validation block has, evenly spread over the training
    block, with fixed masks from a stream of their own (none for a model without masks): what
    a training run scores in eval mode every epoch, beside its training loss."""
    tr = ds["train"]
    sub = tr.starts[np.linspace(0, len(tr) - 1, min(len(tr), max(len(ds["val"]), 1))).round().astype(int)]
    return WindowDataset(tr.X, tr.states, sub, tr.seq_len, tr.mask_cfg, tr.mask_seed + TRAIN_EVAL_MASK_STREAM,
                         fixed=True, eval_warmup=tr.eval_warmup, signal=tr.signal)


def task_datasets(series: Series, data_args: dict, task: str) -> dict:
    """The windows a model of each task is trained and scored on, from its data arguments.

    masked: patch masks from mask_ratio / mask_patch_size / mask_patch_min / mask_patch_max;
    next: no masks, evaluation windows overlapping by eval_warmup so each step after the
    warm-up is scored once (every dataset carries eval_warmup)."""
    if task == "masked":
        mask_cfg = MaskConfig(data_args["mask_ratio"], data_args["mask_patch_size"],
                              data_args["mask_patch_min"], data_args["mask_patch_max"])
        return build_datasets(series, data_args["seq_len"], data_args["stride"], mask_cfg, data_args["seed"],
                              data_args["val_frac"], data_args["test_frac"])
    if task == "next":
        L, w = data_args["seq_len"], data_args["eval_warmup"]
        if not 0 <= w < L - 1:
            raise ValueError(f"--eval-warmup {w} must be in [0, seq_len - 1)")
        ds = build_datasets(series, L, data_args["stride"], None, data_args["seed"], data_args["val_frac"],
                            data_args["test_frac"], eval_stride=L - w)
        for part in ("train", "val", "test"):
            if ds.get(part) is not None:
                ds[part].eval_warmup = w  # what evaluation scores after, in these windows
        return ds
    raise ValueError(f"unknown task {task!r} (masked or next)")


# ----------------------------------------------------------------------------- your own series

def _csv_rows(path: str) -> tuple[list[str] | None, list[list[str]]]:
    import csv
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path} holds no rows")

    def numeric(row):
        try:
            [float(c) for c in row]
            return True
        except ValueError:
            return False
    header = None if numeric(rows[0]) else [c.strip() for c in rows[0]]
    return header, rows[1:] if header else rows


def read_series_file(path: str, labels: str | None = None, standardize: bool = False) -> tuple:
    """A recorded series as (X (T, D) float32, labels (T,) int64 or None, info for config.json).

    .npy: a T x D array. .npz: array X (or the only array) and, optionally, a labels array
    (--labels NAME, default 'labels' when present). .csv: one row per step, an optional
    header; --labels names (or, 0-based, indexes) the label column, every other column is a
    feature. Labels of any kind (names, numbers) become 0..K-1 in sorted order; the names are
    kept in config.json. standardize: each feature to mean 0, std 1 (the statistics are kept)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    ext = os.path.splitext(path)[1].lower()
    lab = None
    if ext == ".npy":
        if labels is not None:
            raise ValueError("--labels needs a .npz or .csv file (a .npy file holds only the features)")
        X = np.load(path, allow_pickle=False)
    elif ext == ".npz":
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            key = "X" if "X" in names else names[0] if len(names) == 1 else None
            if key is None:
                raise ValueError(f"{path} holds arrays {names}; name the features X")
            X = f[key]
            lname = labels if labels is not None else ("labels" if "labels" in names else None)
            if lname is not None:
                if lname not in names:
                    raise ValueError(f"--labels {lname!r}: {path} holds the arrays {names}")
                lab = f[lname]
    elif ext == ".csv":
        header, rows = _csv_rows(path)
        width = len(header) if header else len(rows[0])
        if any(len(r) != width for r in rows):
            raise ValueError(f"{path}: rows have different numbers of columns")
        col = None
        if labels is not None:
            if header and labels in header:
                col = header.index(labels)
            elif labels.isdigit() and int(labels) < width:
                col = int(labels)
            else:
                raise ValueError(f"--labels {labels!r} is not a column of {path}"
                                 + (f" (columns: {', '.join(header)})" if header else f" ({width} columns)"))
        feats = [i for i in range(width) if i != col]
        try:
            X = np.array([[float(r[i]) for i in feats] for r in rows])
        except ValueError as e:
            raise ValueError(f"{path}: a feature column holds a non-number ({e}); name the label column "
                             f"with --labels") from None
        if col is not None:
            lab = np.array([r[col].strip() for r in rows])
    else:
        raise ValueError(f"{path}: give a .npy, .npz or .csv file")
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"{path}: the features must be a T x D array with T >= 2, got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{path}: the features contain NaN or infinite values")
    info: dict = {"source": os.path.abspath(path), "labels": labels if lab is not None else None,
                  "standardized": bool(standardize)}
    if lab is not None:
        lab = np.asarray(lab).reshape(-1)
        if len(lab) != len(X):
            raise ValueError(f"{path}: {len(lab)} labels for {len(X)} steps")
        names, lab = np.unique(lab, return_inverse=True)
        info["label_names"] = [n.item() if hasattr(n, "item") else n for n in names]
        lab = lab.astype(np.int64)
    if standardize:
        mu, sd = X.mean(0), X.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        X = (X - mu) / sd
        info["feature_mean"], info["feature_std"] = mu.tolist(), sd.tolist()
    return X.astype(np.float32), lab, info


def write_data_folder(out_dir: str, X: np.ndarray, labels: np.ndarray | None, info: dict, force: bool) -> None:
    """data.npz (X, and states when there are labels) + config.json (its source, no generator
    parameters), both atomically; an existing data.npz needs force."""
    target = os.path.join(out_dir, "data.npz")
    if os.path.exists(target) and not force:
        raise ValueError(f"{target} exists; pass --force to replace it or choose another --out-dir")
    os.makedirs(out_dir, exist_ok=True)
    arrays = {"X": X} if labels is None else {"X": X, "states": labels}
    tmp = os.path.join(out_dir, ".data.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, target)
    cfg = {**info, "n_steps": int(len(X)), "dim": int(X.shape[1]), "generator": None,
           "n_labels": int(labels.max()) + 1 if labels is not None else 0}
    tmp = os.path.join(out_dir, ".config.tmp.json")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "config.json"))


def build_parser():
    p = Parser(description="Write a recorded series (.npy, .npz or .csv; one row per step) as a data folder "
                           "(data.npz + config.json) that every model and analysis of this project reads.")
    p.add_argument("input", help="the series: a T x D .npy, a .npz with array X (and labels), or a .csv")
    p.add_argument("--out-dir", required=True, help="the data folder to write")
    p.add_argument("--labels", default=None,
                   help="the label column (.csv: header name or 0-based index) or array (.npz; default "
                        "'labels' when present); without labels, figures drop the state strip and "
                        "label-based metrics are skipped")
    p.add_argument("--standardize", action="store_true", help="scale every feature to mean 0, std 1")
    p.add_argument("--force", action="store_true", help="replace the data.npz of an existing folder")
    return p


def main(argv=None) -> int:
    import sys
    args = build_parser().parse_args(argv)
    try:
        X, lab, info = read_series_file(args.input, args.labels, args.standardize)
        write_data_folder(args.out_dir, X, lab, info, args.force)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}/data.npz ({len(X)} steps x {X.shape[1]} features"
          + (f", {int(lab.max()) + 1} labels" if lab is not None else ", no labels") + ") and config.json")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
