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

import os
import secrets
from dataclasses import asdict, dataclass, field

import numpy as np

from cliargs import Parser
from safeio import (InputError, Outputs, atomic_path, check_field, check_fits, json_text, load_npy, load_npz,
                    one_line_errors, output_dir, read_json)

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


GENERATOR_ARRAYS = ("planes", "radii", "entry_angles", "periods", "transition_matrix")  # the process, when generated
MAX_STATES = 10_000        # labels / circles a data folder may declare
MAX_PERIOD = 1_000_000     # steps per lap a generated folder may declare
MAX_ABS = 1e18             # larger observations overflow float32 once squared
GENERATION = "generation"  # the token data.npz and config.json share when one write made both


def _is_real(a) -> bool:
    return a.dtype.kind in "iuf" and a.dtype.fields is None


def validate_series(arrays: dict, config: dict, npz: str, cfg_path: str) -> None:
    """Every array and config field a data folder's readers use, checked once at the boundary:
    wrong type, shape, range or consistency is one InputError naming the file and the field."""
    X = arrays["X"]
    if not _is_real(X):
        raise InputError(f"{npz}: X has dtype {X.dtype}; it must hold real numbers")
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise InputError(f"{npz}: X must be a (T, D) array with T >= 2 steps and D >= 1 features, got {X.shape}")
    T, D = X.shape
    if not np.all(np.isfinite(X)):
        raise InputError(f"{npz}: X contains NaN or infinite values")
    if np.abs(X).max() > MAX_ABS:
        raise InputError(f"{npz}: X holds values up to {np.abs(X).max():.3g}; beyond {MAX_ABS:.0e} their squares "
                         f"overflow float32: rescale the series (python dataset.py FILE --standardize)")
    if "states" in arrays:
        st = arrays["states"]
        if st.dtype.kind not in "iu" or st.shape != (T,):
            raise InputError(f"{npz}: states must be (T,) = ({T},) integers, got {st.shape} of {st.dtype}")
        if T and (st.min() < 0 or st.max() >= MAX_STATES):
            raise InputError(f"{npz}: states must lie in [0, {MAX_STATES}), got [{st.min()}, {st.max()}]")
    for name, shape in (("thetas", (T,)), ("signal", (T, D))):
        if name in arrays:
            a = arrays[name]
            if not _is_real(a) or a.shape != shape or not np.all(np.isfinite(a)):
                raise InputError(f"{npz}: {name} must be a finite real array of shape {shape}, got {a.shape} of {a.dtype}")
    where = cfg_path
    for k in ("noise_var", "noise_std"):
        check_field(config, k, float, where, lo=0, required=False)
    if "noise_var" in config and "noise_std" in config and \
            not np.isclose(config["noise_var"], config["noise_std"] ** 2, rtol=1e-6, atol=1e-12):
        raise InputError(f"{where}: noise_var {config['noise_var']} is not noise_std**2 = {config['noise_std'] ** 2}")
    check_field(config, "seed", int, where, lo=0, required=False)
    for k in ("dwell_mean", "radius_mean"):
        check_field(config, k, float, where, lo=0, open_lo=True, required=False)
    for k in ("dwell_std", "radius_std"):
        check_field(config, k, float, where, lo=0, required=False)
    n_labels = int(arrays["states"].max()) + 1 if "states" in arrays and T else 0
    for k in ("n_circles", "n_labels"):
        n = check_field(config, k, int, where, lo=0, hi=MAX_STATES, required=False)
        if n is not None and n < n_labels:
            raise InputError(f"{where}: {k} is {n} but the states reach label {n_labels - 1}")
    if check_field(config, "n_steps", int, where, required=False) not in (None, T):
        raise InputError(f"{where}: n_steps is {config['n_steps']} but {npz} holds {T} steps")
    for k in ("ambient_dim", "dim"):
        if check_field(config, k, int, where, required=False) not in (None, D):
            raise InputError(f"{where}: {k} is {config[k]} but {npz} holds {D}-D observations")
    present = [k for k in GENERATOR_ARRAYS if k in arrays]
    if present:
        _validate_process(arrays, config, npz, where, D)


def _validate_process(arrays: dict, config: dict, npz: str, where: str, D: int) -> None:
    """The generator's arrays (the process the oracle and fresh draws rebuild) agree with each other."""
    missing = [k for k in GENERATOR_ARRAYS if k not in arrays]
    if missing:
        raise InputError(f"{npz} holds some of the generator's arrays but not {', '.join(missing)}; "
                         f"regenerate the folder with markov_circles_timeseries.py")
    per = arrays["periods"]
    if per.ndim != 1 or per.dtype.kind not in "iu" or not 2 <= len(per) <= MAX_STATES:
        raise InputError(f"{npz}: periods must be a 1-D integer array of 2..{MAX_STATES} circles, got {per.shape} "
                         f"of {per.dtype}")
    C = len(per)
    if per.min() < 1 or per.max() > MAX_PERIOD:
        raise InputError(f"{npz}: periods must lie in [1, {MAX_PERIOD}], got [{per.min()}, {per.max()}]")
    for name, shape in (("radii", (C,)), ("entry_angles", (C,)), ("planes", (C, 2, D)), ("transition_matrix", (C, C))):
        a = arrays[name]
        if not _is_real(a) or a.shape != shape or not np.all(np.isfinite(a)):
            raise InputError(f"{npz}: {name} must be a finite real array of shape {shape} ({C} circles, "
                             f"{D}-D), got {a.shape} of {a.dtype}")
    P = arrays["transition_matrix"].astype(np.float64)
    if P.min() < 0 or not np.allclose(P.sum(1), 1.0, atol=1e-6):
        raise InputError(f"{npz}: transition_matrix must have non-negative rows that sum to 1")
    if "n_circles" in config and config["n_circles"] != C:
        raise InputError(f"{where}: n_circles is {config['n_circles']} but {npz} describes {C} circles")
    if "states" in arrays and len(arrays["states"]) and arrays["states"].max() >= C:
        raise InputError(f"{npz}: states reach {arrays['states'].max()} but the process has {C} circles")


def load_series(data_dir: str) -> Series:
    """Load data.npz + config.json, with one clear error for each way it can be wrong (every field
    the readers use is checked by validate_series; a folder whose two files come from different
    writes, as a kill between them leaves it, is refused with the fix)."""
    npz = os.path.join(data_dir, "data.npz")
    cfg_path = os.path.join(data_dir, "config.json")
    if not os.path.isdir(data_dir):
        if os.path.exists(data_dir):
            raise InputError(f"data directory {data_dir!r} is a file; pass the folder that holds data.npz")
        raise FileNotFoundError(
            f"data directory {data_dir!r} does not exist; generate it with "
            f"`python markov_circles_timeseries.py --out-dir {data_dir}`")
    if os.path.lexists(npz) and not os.path.isfile(npz):
        raise InputError(f"{npz} is not a regular file (a folder, a pipe, a device or a broken link)")
    if not os.path.isfile(npz):
        raise FileNotFoundError(
            f"{npz} not found; generate the data with `python markov_circles_timeseries.py --out-dir {data_dir}` "
            f"or convert a recorded series with `python dataset.py FILE --out-dir {data_dir}`")
    arrays = load_npz(npz, "data file")
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise InputError(f"{npz} lacks the arrays {missing}; write data folders with markov_circles_timeseries.py "
                         f"or `python dataset.py FILE --out-dir DIR`")
    config = read_json(cfg_path, "data config", kind=dict) if os.path.exists(cfg_path) else {}
    token = arrays.pop(GENERATION, None)
    token = str(token) if token is not None and token.shape == () else None
    if token != config.get(GENERATION) and (token is not None or GENERATION in config):
        raise InputError(f"{data_dir} is incomplete: data.npz and config.json come from different writes (a write "
                         f"was killed between them); rerun the command that wrote it with --force")
    validate_series(arrays, config, npz, cfg_path)
    X = arrays["X"]
    has_labels = "states" in arrays
    states = arrays["states"] if has_labels else np.zeros(len(X), np.int64)
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
        raise ValueError(f"--val-frac {val_frac} and --test-frac {test_frac} leave no training block: each must lie "
                         f"in [0, 1) and together below 1")
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
    warm-up is scored once (every dataset carries eval_warmup). train_data "fresh": the training
    windows move to a new draw of the folder's process every epoch (FreshWindows); validation and
    test are the folder's own blocks either way."""
    if task == "masked":
        mask_cfg = MaskConfig(data_args["mask_ratio"], data_args["mask_patch_size"],
                              data_args["mask_patch_min"], data_args["mask_patch_max"])
        ds = build_datasets(series, data_args["seq_len"], data_args["stride"], mask_cfg, data_args["seed"],
                            data_args["val_frac"], data_args["test_frac"])
    elif task == "next":
        L, w = data_args["seq_len"], data_args["eval_warmup"]
        if not 0 <= w < L - 1:
            raise ValueError(f"--eval-warmup {w} must be in [0, seq_len - 1)")
        ds = build_datasets(series, L, data_args["stride"], None, data_args["seed"], data_args["val_frac"],
                            data_args["test_frac"], eval_stride=L - w)
        for part in ("train", "val", "test"):
            if ds.get(part) is not None:
                ds[part].eval_warmup = w  # what evaluation scores after, in these windows
    else:
        raise ValueError(f"unknown task {task!r} (masked or next)")
    mode = data_args.get("train_data", "fixed")
    if mode == "fresh":
        lo, hi = ds["splits"].train
        ds["train"] = FreshWindows(ds["train"], series, hi - lo)
    elif mode != "fixed":
        raise ValueError(f"unknown training-data mode {mode!r} (fixed or fresh)")
    return ds


class FreshWindows(WindowDataset):
    """The training windows of a fixed run (same starts, stride, masks), laid over draw `epoch` of
    the data folder's process (circles.fresh_draw: same geometry and laws, new transitions and
    noise) of the training block's length: a new trajectory every epoch, so nothing can be
    memorised. Draw k depends only on the folder's seed and k, so a resumed run continues the
    same sequence of draws. The next epoch's draw is made in a background thread while this one
    trains, so drawing never stalls the steps."""

    def __init__(self, base: WindowDataset, series: Series, n_steps: int):
        from circles import Process
        super().__init__(base.X, base.states, base.starts, base.seq_len, base.mask_cfg, base.mask_seed, fixed=False,
                         eval_warmup=base.eval_warmup, signal=base.signal)
        self.process = Process.from_series(series)
        self.seed = int(series.config.get("seed", 0))
        self.n_steps = int(n_steps)
        if len(base.starts) and (base.starts.min() < 0 or base.starts.max() + base.seq_len > self.n_steps):
            raise ValueError("fresh training windows must lie in a block starting at step 0")
        self.draw_index = None   # the draw the windows lie on now (None: the folder's own training block)
        self._pool = self._pending = None

    def draw(self, k: int) -> dict:
        from circles import fresh_draw
        return fresh_draw(self.process, self.seed, k, self.n_steps)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.draw_index != epoch:
            k, fut = self._pending or (None, None)
            d = fut.result() if k == epoch else self.draw(epoch)
            self.X, self.states, self.signal = d["X"], d["states"], d["signal"]
            self.draw_index = epoch
        self._prefetch(epoch + 1)

    def _prefetch(self, k: int) -> None:
        if self._pending and self._pending[0] == k:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fresh-draw")
        self._pending = (k, self._pool.submit(self.draw, k))

    def __getstate__(self):  # DataLoader workers get the current draw, not the thread
        st = dict(self.__dict__)
        st["_pool"] = st["_pending"] = None
        return st


# ----------------------------------------------------------------------------- your own series

def _numeric(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _csv_rows(path: str, header: str = "auto") -> tuple[list[str] | None, list[list[str]]]:
    """(header or None, data rows) of a CSV. A byte-order mark is dropped. header "auto": the
    first row is a header when some column holds a non-number there and a number in the next
    row (so a headerless file whose label column is text keeps its first row); "yes" / "no" say it."""
    import csv
    check_fits(12 * os.path.getsize(path), f"reading {path}", "convert it to .npy first")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give a .csv, .npy or .npz file") from None
    except csv.Error as e:
        raise InputError(f"{path} is not a readable CSV file ({e})") from None
    if not rows:
        raise InputError(f"{path} holds no rows")
    if header == "auto":
        first = rows[0]
        has = (any(not _numeric(c) and _numeric(d) for c, d in zip(first, rows[1])) if len(rows) > 1
               else not all(_numeric(c) for c in first))
    else:
        has = header == "yes"
    return ([c.strip() for c in rows[0]], rows[1:]) if has else (None, rows)


def _bad_cell(path: str, rows: list, feats: list, head) -> str:
    """The one line for a CSV feature cell that is not a number: where it is, what it holds, the likely fix."""
    for i, r in enumerate(rows):
        for j in feats:
            if not _numeric(r[j]):
                cell = r[j].strip()
                where = f"{path}: data row {i + 1}, column {j}" + (f" ({head[j]!r})" if head else "")
                if cell == "" or cell.upper() in ("NA", "N/A", "NAN", "NULL", "NONE", "-"):
                    return f"{where} is empty or missing ({cell!r}): fill or drop the missing values first"
                if ";" in cell or "\t" in cell:
                    return f"{where} holds {cell!r:.40}: the file is not comma-separated; save it with commas"
                if "," in cell:
                    return f"{where} holds {cell!r:.40}: write decimals with a point, not a comma"
                return (f"{where} holds {cell!r:.40}, not a number: if it is a label column, name it with --labels "
                        f"{j if not head else head[j]}")
    return f"{path}: a feature column holds a non-number"


def _labels_of(lab, n_steps: int, path: str) -> tuple[np.ndarray, list]:
    """Labels of any kind (names or numbers) as 0..K-1 in sorted order, and their names."""
    lab = np.asarray(lab)
    if lab.dtype.fields is not None or lab.dtype.kind in "cOV":
        raise InputError(f"{path}: labels of dtype {lab.dtype} cannot be used; give integers or names")
    lab = lab.reshape(-1)
    if len(lab) != n_steps:
        raise InputError(f"{path}: {len(lab)} labels for {n_steps} steps")
    if lab.dtype.kind == "f" and not np.all(np.isfinite(lab)):
        raise InputError(f"{path}: the labels contain NaN or infinite values")
    names, inv = np.unique(lab, return_inverse=True)
    if len(names) > MAX_STATES:
        raise InputError(f"{path}: the labels take {len(names):,} distinct values (at most {MAX_STATES:,}); "
                         f"is --labels a feature column?")
    return inv.astype(np.int64), [n.item() if hasattr(n, "item") else n for n in names]


def read_series_file(path: str, labels: str | None = None, standardize: bool = False, header: str = "auto") -> tuple:
    """A recorded series as (X (T, D) float32, labels (T,) int64 or None, info for config.json).

    .npy: a T x D array. .npz: array X (or the only array) and, optionally, a labels array
    (--labels NAME, default 'labels' when present). .csv: one row per step, an optional
    header (see _csv_rows); --labels names (or, 0-based, indexes) the label column, every other
    column is a feature. Labels of any kind (names, numbers) become 0..K-1 in sorted order; the
    names are kept in config.json. standardize: each feature to mean 0, std 1 (the statistics
    are kept). Every way the file can be wrong is one InputError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; give a .npy, .npz or .csv file")
    ext = os.path.splitext(path)[1].lower()
    lab = None
    if ext == ".npy":
        if labels is not None:
            raise InputError("--labels needs a .npz or .csv file (a .npy file holds only the features)")
        X = load_npy(path, "series file")
    elif ext == ".npz":
        arrays = load_npz(path, "series file")
        names = list(arrays)
        key = "X" if "X" in names else names[0] if len(names) == 1 else None
        if key is None:
            raise InputError(f"{path} holds arrays {names}; name the features X")
        X = arrays[key]
        lname = labels if labels is not None else ("labels" if "labels" in names else None)
        if lname is not None:
            if lname not in names or lname == key:
                raise InputError(f"--labels {lname!r}: {path} holds the arrays {names}")
            lab = arrays[lname]
    elif ext == ".csv":
        head, rows = _csv_rows(path, header)
        if not rows:
            raise InputError(f"{path} holds a header and no data rows")
        width = len(head) if head else len(rows[0])
        bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
        if bad is not None:
            raise InputError(f"{path}: data row {bad + 1} has {len(rows[bad])} columns, the first has {width}")
        col = None
        if labels is not None:
            if head and labels in head:
                col = head.index(labels)
            elif labels.isdigit() and int(labels) < width:
                col = int(labels)
            else:
                raise InputError(f"--labels {labels!r} is not a column of {path}"
                                 + (f" (columns: {', '.join(head)})" if head else f" ({width} columns)"))
        feats = [i for i in range(width) if i != col]
        try:
            X = np.array([[float(r[i]) for i in feats] for r in rows], dtype=np.float64).reshape(len(rows), len(feats))
        except ValueError:
            raise InputError(_bad_cell(path, rows, feats, head)) from None
        if col is not None:
            lab = np.array([r[col].strip() for r in rows])
    else:
        raise InputError(f"{path}: give a .npy, .npz or .csv file")
    X = np.asarray(X)
    if X.dtype.fields is not None or X.dtype.kind not in "biuf":
        raise InputError(f"{path}: the features have dtype {X.dtype}; they must be real numbers")
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or len(X) < 2 or X.shape[1] < 1:
        raise InputError(f"{path}: the features must be a T x D array with T >= 2 and D >= 1, got shape {X.shape}")
    X = X.astype(np.float64, copy=False)
    if not np.all(np.isfinite(X)):
        raise InputError(f"{path}: the features contain NaN or infinite values")
    too_big = np.abs(X) > np.finfo(np.float32).max
    if too_big.any():
        raise InputError(f"{path}: {int(too_big.sum())} feature value(s) lie beyond float32's range (|x| > 3.4e38); "
                         f"rescale the series")
    info: dict = {"source": os.path.abspath(path), "labels": labels if lab is not None else None,
                  "standardized": bool(standardize)}
    if lab is not None:
        lab, info["label_names"] = _labels_of(lab, len(X), path)
    if standardize:
        mu, sd = X.mean(0), X.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        X = (X - mu) / sd
        info["feature_mean"], info["feature_std"] = mu.tolist(), sd.tolist()
    return X.astype(np.float32), lab, info


DATA_KEY = "data folder"   # the safeio.Outputs key every writer of a data folder shares
DATA_FILES = ("data.npz", "config.json")


def data_outputs(out_dir: str, force: bool, also: list[str] = ()) -> Outputs:
    """Claim a data folder: data.npz, config.json, the paths in `also`, and whatever a data-folder
    writer recorded there before (a generator's summary and figure numbers), so replacing a
    folder with --force leaves nothing of the old series behind; without force, any of them
    stops the command."""
    out = Outputs(DATA_KEY, force)
    out.claim([os.path.join(out_dir, f) for f in DATA_FILES] + list(also))
    return out


def incomplete_write(out_dir: str) -> bool:
    """Whether out_dir holds a data folder that a killed write left half done: data.npz and config.json
    both recorded by a data-folder writer, but one of them missing or the two from different writes.
    Such a folder is this project's own unfinished output, so writing it again needs no --force."""
    from safeio import recorded
    paths = [os.path.join(out_dir, f) for f in DATA_FILES]
    present = [p for p in paths if os.path.isfile(p)]
    ours = {os.path.abspath(p) for p in recorded(DATA_KEY, out_dir)}
    if not present or any(os.path.abspath(p) not in ours for p in present):
        return False
    if len(present) < 2:
        return True
    import zipfile
    try:   # both present: torn only when both are whole files of this project with tokens that differ
        with zipfile.ZipFile(paths[0]) as z:
            if f"{GENERATION}.npy" not in z.namelist():
                return False
            with z.open(f"{GENERATION}.npy") as f:
                token = str(np.lib.format.read_array(f, allow_pickle=False))
        other = read_json(paths[1], "data config", kind=dict).get(GENERATION)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, InputError):
        return False   # a file someone edited or broke: not ours to rewrite without --force
    return isinstance(other, str) and other != token


def save_data_folder(out_dir: str, arrays: dict, config: dict, out: Outputs) -> None:
    """data.npz and config.json, each atomically and marked with one shared random token:
    load_series refuses a folder whose two files come from different writes (a kill between
    the two renames), so a reader never uses a mix."""
    token = secrets.token_hex(8)
    npz, cfg = (out.target(os.path.join(out_dir, f)) for f in DATA_FILES)
    text = json_text({**config, GENERATION: token})
    with atomic_path(npz) as t_npz:
        with open(t_npz, "wb") as f:
            np.savez(f, **arrays, **{GENERATION: np.array(token)})
        with atomic_path(cfg) as t_cfg:
            with open(t_cfg, "w", encoding="utf-8") as f:
                f.write(text)


def write_data_folder(out_dir: str, X: np.ndarray, labels: np.ndarray | None, info: dict, force: bool) -> None:
    """data.npz (X, and states when there are labels) + config.json (its source, no generator
    parameters); an existing data folder needs force (which replaces all of it), unless a killed
    write left it unfinished."""
    if not force and incomplete_write(out_dir):
        print(f"note: {out_dir} was left unfinished by a killed write; writing it again")
        force = True
    out = data_outputs(out_dir, force)
    arrays = {"X": X} if labels is None else {"X": X, "states": labels}
    cfg = {**info, "n_steps": int(len(X)), "dim": int(X.shape[1]), "generator": None,
           "n_labels": int(labels.max()) + 1 if labels is not None else 0}
    save_data_folder(out_dir, arrays, cfg, out)


def build_parser():
    p = Parser(description="Write a recorded series (.npy, .npz or .csv; one row per step) as a data folder "
                           "(data.npz + config.json) that every model and analysis of this project reads.")
    p.add_argument("input", help="the series: a T x D .npy, a .npz with array X (and labels), or a .csv")
    p.add_argument("--out-dir", required=True, help="the data folder to write")
    p.add_argument("--labels", default=None,
                   help="the label column (.csv: header name or 0-based index) or array (.npz; default "
                        "'labels' when present); without labels, figures drop the state strip and "
                        "label-based metrics are skipped")
    p.add_argument("--header", choices=("auto", "yes", "no"), default="auto",
                   help=".csv: whether the first row names the columns (auto: when some column holds a "
                        "non-number in the first row and a number in the second)")
    p.add_argument("--standardize", action="store_true", help="scale every feature to mean 0, std 1")
    p.add_argument("--force", action="store_true",
                   help="replace an existing data folder (data.npz, config.json and what the generator wrote beside them)")
    return p


@one_line_errors()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    output_dir(args.out_dir, create=False)
    X, lab, info = read_series_file(args.input, args.labels, args.standardize, args.header)
    output_dir(args.out_dir)
    write_data_folder(args.out_dir, X, lab, info, args.force)
    print(f"wrote {args.out_dir}/data.npz ({len(X)} steps x {X.shape[1]} features"
          + (f", {int(lab.max()) + 1} labels" if lab is not None else ", no labels") + ") and config.json")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
