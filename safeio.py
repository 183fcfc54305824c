"""Safe input and output for every command: the one place where files are written, read and claimed.

Writing. Every file a command writes goes through `atomic` (or `write_json`, `write_csv`,
`save_npz`, ...): the bytes go to a temporary file beside the target, are flushed to disk, and
the temporary file is renamed onto the target. A reader (or a rerun after a kill) sees the old
file or the whole new one, never half of it. JSON is written strictly: a NaN or infinity
becomes null and its place is named in the object's "nonfinite" list, so no undefined number
reaches a JSON file unnamed (and every file parses with any JSON reader).

Reading. `read_json` reads a JSON file a user or another program may have written: one line
naming the file for a missing, unreadable, oversized, non-UTF-8, invalid or absurdly nested
file (Python's parser would otherwise end in a RecursionError). `check_field` validates one
field of what was read (type, range), naming the file and the field.

Claiming. Nothing is overwritten without --force: a command declares the files it will write
(`Outputs.claim`); any of them that exists stops it (OutputsExist), and with --force exactly
those are removed first, together with what the same command recorded in an earlier run
(a hidden manifest, `.outputs.json`, per folder): never a glob of the user's folder.

Folders, names and sizes. `output_dir` refuses an --out-dir that is a file or cannot be
written; `plain_name` and `inside` keep names from a user or a file inside the folder they
belong to; `check_fits` refuses an allocation larger than the memory the machine has.

Entry points. `one_line_errors` wraps a command's main(): a bad input, an unreadable or
unwritable path, an allocation that cannot succeed or a file nested too deep ends with one
line on stderr and exit status 2 instead of a traceback (set SHOW_TRACEBACK=1 to see it).

This module imports only the standard library and numpy (lazily), so every module may use it.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import re
import secrets
import sys

MANIFEST = ".outputs.json"
MAX_JSON_BYTES = 256 * 2 ** 20


class InputError(ValueError):
    """A file, folder, flag or field a command cannot use; the message names it and the fix."""


class OutputsExist(InputError):
    """Earlier outputs a command would replace, without --force."""


# ----------------------------------------------------------------------------- writing

@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path in the target's folder; when the block ends without an error the
    file written there is flushed to disk and renamed onto `path` (readers see the old file or the
    whole new one). On an error the temporary file is removed and the target is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    while True:  # O_EXCL with the umask's permissions (mkstemp would make it private)
        tmp = os.path.join(folder, f".{base[:200]}.{os.getpid()}{secrets.token_hex(3)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic(path: str, mode: str = "w", **kwargs):
    """An open file (text "w" or binary "wb") whose content replaces `path` atomically when the block ends."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic writes open files with 'w' or 'wb', not {mode!r}")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `atomic_path`'s temporary files (left by a kill)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_temporaries(folder: str) -> list[str]:
    """Remove the temporary files a killed writer left in a folder; returns their names."""
    gone = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            p = os.path.join(folder, name)
            if is_temporary(name) and os.path.isfile(p) and not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.remove(p)
                    gone.append(name)
    return gone


def _writer_alive(name: str, base: str) -> bool:
    """Whether the process that made the temporary file `name` (.<base>.<pid><6 hex>.tmp) still runs."""
    pid = name[len(base) + 2:-len(".tmp")][:-6]
    if not pid.isdigit():
        return True                                   # not one of ours: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(paths: list[str]) -> list[str]:
    """Remove the temporary files a killed writer of exactly these paths left beside them (ours, whose
    process is gone, and an older figure writer's <stem>.tmp<ext>), never another file of the folder,
    so that a rerun starts clean. Returns the removed paths."""
    gone = []
    for p in paths:
        folder, base = os.path.split(os.path.abspath(p))
        if not os.path.isdir(folder):
            continue
        stem, ext = os.path.splitext(base)
        cands = [os.path.join(folder, f"{stem}.tmp{ext}")] if ext else []
        cands += [os.path.join(folder, n) for n in os.listdir(folder)
                  if is_temporary(n) and n.startswith(f".{base[:200]}.") and not _writer_alive(n, base[:200])]
        for c in cands:
            if os.path.isfile(c) and not os.path.islink(c):
                with contextlib.suppress(OSError):
                    os.remove(c)
                    gone.append(c)
    return gone


def finite_json(obj, where: str = "", found: list | None = None):
    """obj with every NaN / infinite float replaced by None; the JSON paths of the replaced values
    are appended to `found`. numpy scalars and arrays become plain numbers and lists."""
    found = [] if found is None else found
    if isinstance(obj, dict):
        return {str(k): finite_json(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        found.append(where or "(value)")
        return None
    if type(obj).__module__ == "numpy":
        return finite_json(obj.tolist(), where, found)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # torch tensors
        return finite_json(obj.tolist(), where, found)
    raise TypeError(f"{where or 'value'} of type {type(obj).__name__} cannot be written as JSON")


def json_text(obj, indent: int | None = 2) -> str:
    """Strict JSON for obj: non-finite numbers become null and, when obj is an object, their
    places are listed in its "nonfinite" entry (merged with one already there)."""
    found: list = []
    clean = finite_json(obj, "", found)
    if found and isinstance(clean, dict):
        clean["nonfinite"] = sorted(set((clean.get("nonfinite") or []) + found))
    return json.dumps(clean, indent=indent, allow_nan=False) + "\n"


def write_json(path: str, obj, indent: int | None = 2) -> str:
    """Write obj as strict JSON (see json_text), atomically. Returns path."""
    text = json_text(obj, indent)
    with atomic(path) as f:
        f.write(text)
    return path


def write_text(path: str, text: str) -> str:
    with atomic(path) as f:
        f.write(text)
    return path


def write_csv(path: str, header: list, rows) -> str:
    """A CSV with a header row, atomically; NaN cells are written empty."""
    def cell(v):
        return "" if isinstance(v, float) and not math.isfinite(v) else v
    with atomic(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([cell(v) for v in (r if isinstance(r, (list, tuple)) else [r.get(k, "") for k in header])])
    return path


def save_npz(path: str, compressed: bool = False, **arrays) -> str:
    """np.savez (no pickles: object arrays are refused), atomically."""
    import numpy as np
    for k, v in arrays.items():
        if np.asarray(v).dtype.hasobject:
            raise TypeError(f"array {k} holds Python objects; only plain arrays are written")
    with atomic(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return path


def save_npy(path: str, array) -> str:
    import numpy as np
    with atomic(path, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)
    return path


# ----------------------------------------------------------------------------- reading

def regular_file(path: str, what: str = "file") -> str:
    """path, or one line (InputError) when it is missing, a folder, or not a regular file (a pipe or a
    device, which would block a reader or never end)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"{what} {path} is a broken link")
    if not os.path.exists(path):
        raise InputError(f"{what} {path} not found")
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} is not a regular file (a pipe or a device?)")
    return path


def read_bytes(path: str, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """A file's bytes, or one line (InputError) when it is missing, a folder, unreadable or too big."""
    regular_file(path, what)
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise InputError(f"{what} {path} has {size:,} bytes, more than the {max_bytes:,} accepted")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None


def parse_json(text: str | bytes, where: str):
    """json.loads with one-line errors naming `where` (invalid, not UTF-8, nested too deep)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"{where} is not UTF-8 text (a binary file?)") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to be a file this project wrote") from None
    except ValueError as e:
        raise InputError(f"{where} is not valid JSON ({e})") from None


def read_json(path: str, what: str = "JSON file", kind: type | None = None, max_bytes: int = MAX_JSON_BYTES):
    """Parse a JSON file, with one line naming it for every way it can be wrong; kind (dict or
    list) also checks the top-level type."""
    obj = parse_json(read_bytes(path, what, max_bytes), f"{what} {path}")
    if kind is not None and not isinstance(obj, kind):
        noun = {dict: "an object", list: "a list"}.get(kind, kind.__name__)
        raise InputError(f"{what} {path} holds a JSON {type(obj).__name__}, not {noun}")
    return obj


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "an object"}


def check_field(obj: dict, key: str, kinds, where: str, *, lo=None, hi=None, required: bool = True,
                nullable: bool = False, choices=None, open_lo: bool = False):
    """obj[key] checked against kinds (int, float: any finite number, str, bool, list, dict, or a
    tuple of them), an inclusive range [lo, hi] (open at lo with open_lo) and choices; one line
    (InputError) naming `where` and the field otherwise. Returns the value (None when absent and
    not required, or null and nullable)."""
    if key not in obj:
        if required:
            raise InputError(f"{where}: the field {key!r} is missing")
        return None
    v = obj[key]
    if v is None and nullable:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)

    def fits(k):
        if k is bool:
            return isinstance(v, bool)
        if k is int:
            return isinstance(v, int) and not isinstance(v, bool)
        if k is float:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return isinstance(v, k)
    if not any(fits(k) for k in kinds):
        want = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise InputError(f"{where}: the field {key!r} must be {want}, got {v!r:.80}")
    if choices is not None and v not in choices:
        raise InputError(f"{where}: the field {key!r} must be one of {list(choices)}, got {v!r:.80}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if lo is not None and (v < lo or (open_lo and v == lo)):
            raise InputError(f"{where}: the field {key!r} must be {'>' if open_lo else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            raise InputError(f"{where}: the field {key!r} must be <= {hi}, got {v}")
    return v


def check_dataclass_fields(cls, values: dict, where: str) -> dict:
    """The entries of `values` for the fields of dataclass `cls`, each checked against the field's
    annotation (int, float, str, bool, optionally `| None`); unknown keys and wrong types are one
    line naming `where`. Returns the checked dict."""
    import dataclasses
    if not isinstance(values, dict):
        raise InputError(f"{where}: the configuration is a {type(values).__name__}, not an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise InputError(f"{where}: unknown configuration field(s) {', '.join(map(repr, unknown[:5]))}")
    for name, f in fields.items():
        if name not in values:
            continue
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = [p.strip() for p in str(ann).replace("Optional[", "").rstrip("]").split("|")]
        nullable = "None" in parts
        kinds = tuple({"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict,
                       "tuple": list}[p.split("[")[0]] for p in parts if p != "None" and p.split("[")[0] in
                      ("int", "float", "str", "bool", "list", "dict", "tuple"))
        if kinds:
            check_field(values, name, kinds, where, nullable=nullable)
    return values


# ----------------------------------------------------------------------------- numpy files

def npy_header(f, where: str):
    """(shape, dtype, fortran_order) of an .npy stream positioned at its start; one line when it is not one."""
    import numpy as np
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = fmt._read_array_header(f, version)
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        raise InputError(f"{where} is not a readable .npy array ({first_line(e, 120)})") from None
    return shape, dtype, fortran


def _claimed_bytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


def load_npy(path: str, what: str = "array file"):
    """np.load of a plain .npy (no pickles), refusing a header that claims more bytes than the
    file holds (before allocating anything)."""
    import numpy as np
    regular_file(path, what)
    raw_size = os.path.getsize(path)
    with open(path, "rb") as f:
        shape, dtype, _ = npy_header(f, f"{what} {path}")
        if dtype.hasobject:
            raise InputError(f"{what} {path} holds Python objects; only plain numeric arrays are read")
        need = _claimed_bytes(shape, dtype)
        if need > raw_size - f.tell():
            raise InputError(f"{what} {path}: its header claims a {shape} array ({need:,} bytes) but the file "
                             f"holds {raw_size - f.tell():,} bytes of data")
    return np.load(path, allow_pickle=False)


def load_npz(path: str, what: str = "array file") -> dict:
    """Every array of an .npz (no pickles), each member's header checked against its size first,
    so a header that lies about the shape is one line instead of a huge allocation."""
    import zipfile

    import numpy as np
    regular_file(path, what)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(f"{what} {path} is not a readable .npz file ({e})") from None
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            try:
                with zf.open(info) as f:
                    shape, dtype, _ = npy_header(f, f"{what} {path} (array {info.filename[:-4]})")
                    header_len = f.tell()
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
                raise InputError(f"{what} {path} is not a readable .npz file ({e})") from None
            if dtype.hasobject:
                raise InputError(f"{what} {path}: array {info.filename[:-4]} holds Python objects; "
                                 f"only plain numeric arrays are read")
            need = _claimed_bytes(shape, dtype)
            if need > info.file_size - header_len:
                raise InputError(f"{what} {path}: array {info.filename[:-4]} claims {shape} ({need:,} bytes) "
                                 f"but holds {info.file_size - header_len:,}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise InputError(f"{what} {path} is not a readable .npz file ({first_line(e, 160)})") from None


# ----------------------------------------------------------------------------- folders and names

def output_dir(path: str, flag: str = "--out-dir", create: bool = True) -> str:
    """A folder outputs can go to: one line when it names a file, lies under a file, or cannot be
    created or written. Creates it when create."""
    if not path:
        raise InputError(f"{flag} is empty; name a folder")
    if "\0" in path:
        raise InputError(f"{flag} holds a NUL character")
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"{flag} {path} is a broken link; remove it or choose another {flag}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a folder; choose a folder")
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    probe = probe or "."
    if not os.path.isdir(probe):
        raise InputError(f"{flag} {path}: {probe} is a file, so the folder cannot be made; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {os.path.abspath(probe)} is not writable; choose another {flag}")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise InputError(f"{flag} {path} cannot be created ({e.strerror or e}); choose another {flag}") from None
    return path


def check_writable_file(path: str, flag: str) -> str:
    """A file path outputs can be written to: its folder can be made and written, and it is not a folder."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder; give a file path")
    output_dir(os.path.dirname(os.path.abspath(path)), flag, create=False)
    return path


_NAME = re.compile(r"^[A-Za-z0-9_.,=+@%-]+$")


def plain_name(name: str, what: str) -> str:
    """A name that becomes one file or folder name: letters, digits and _.,=+@%-, not '.' or
    '..', at most 200 characters; one line otherwise."""
    if not isinstance(name, str) or not name or len(name) > 200 or name in (".", "..") or not _NAME.match(name):
        raise InputError(f"{what} {name!r:.80} cannot be a file name: use letters, digits and _.,=+@%- only "
                         f"(no '/', not '.' or '..', at most 200 characters)")
    return name


def inside(folder: str, rel: str, what: str) -> str:
    """folder/rel, refusing a rel that is absolute or leads outside folder (after symlinks)."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        raise InputError(f"{what} {rel!r:.80} must be a path relative to {folder}")
    full = os.path.join(folder, rel)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(full)]) != root:
        raise InputError(f"{what} {rel!r:.80} leads outside {folder}; refused")
    return full


# ----------------------------------------------------------------------------- memory

def available_bytes() -> int:
    """Memory the machine can still give (MemAvailable), or a large number when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_fits(nbytes: float, what: str, fix: str) -> None:
    """One line (InputError) when nbytes exceeds the memory available now."""
    have = available_bytes()
    if nbytes > have:
        raise InputError(f"{what} needs about {human_bytes(nbytes)} but {human_bytes(have)} of memory is available; "
                         f"{fix}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


# ----------------------------------------------------------------------------- claiming outputs

def _manifest_path(folder: str) -> str:
    return os.path.join(folder, MANIFEST)


def _read_manifest(folder: str) -> dict:
    """{key: [file names]} recorded in folder; a missing or damaged manifest reads as empty (it only
    ever adds files to remove with --force, and only names inside the folder are used)."""
    p = _manifest_path(folder)
    if not os.path.isfile(p):
        return {}
    try:
        m = parse_json(read_bytes(p, "manifest", 16 * 2 ** 20), p)
    except InputError:
        return {}
    if not isinstance(m, dict):
        return {}
    return {k: [n for n in v if isinstance(n, str)] for k, v in m.items() if isinstance(k, str) and isinstance(v, list)}


def recorded(key: str, folder: str) -> list[str]:
    """Paths of the files `key` recorded in folder (names that would leave the folder are dropped)."""
    out = []
    for name in _read_manifest(folder).get(key, []):
        # record() writes bare file names: anything else (a path, a link's way out) is not ours to remove
        if not name or "/" in name or "\\" in name or name in (".", "..", MANIFEST) or "\0" in name:
            continue
        out.append(os.path.join(folder, name))
    return out


def recorded_by(path: str) -> set[str]:
    """The keys that recorded `path` in its folder's manifest."""
    folder, name = os.path.split(os.path.abspath(path))
    return {k for k, names in _read_manifest(folder).items() if name in names}


@contextlib.contextmanager
def _manifest_lock(folder: str):
    """flock on the folder itself (no lock file is left beside the user's files)."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # no flock (Windows) or an unopenable folder: no lock
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(key: str, paths: list[str]) -> None:
    """Add paths to the manifest of their folders under key (before they are written, so a
    command killed while writing them still knows them next time). A file has one writer: the
    names leave any other key's record (a stale record of a file since deleted by hand and written
    by another command would otherwise let the first command's --force remove it)."""
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        by_folder.setdefault(os.path.dirname(os.path.abspath(p)), []).append(os.path.basename(p))
    for folder, names in by_folder.items():
        os.makedirs(folder, exist_ok=True)
        with _manifest_lock(folder):
            m = _read_manifest(folder)
            have = m.get(key, [])
            new = {**m, key: have + [n for n in names if n not in have]}
            for other in [k for k in m if k != key]:
                new[other] = [n for n in m[other] if n not in names]
                if not new[other]:
                    del new[other]
            if new != m:
                write_json(_manifest_path(folder), new, indent=1)


def forget(key: str, folder: str, paths: list[str] | None = None) -> None:
    """Drop key's record in folder (or only the given paths)."""
    if not os.path.isfile(_manifest_path(folder)):
        return
    with _manifest_lock(folder):
        m = _read_manifest(folder)
        if key not in m:
            return
        if paths is None:
            del m[key]
        else:
            names = {os.path.basename(p) for p in paths}
            m[key] = [n for n in m[key] if n not in names]
        write_json(_manifest_path(folder), m, indent=1)


def _remove_file(p: str) -> None:
    if os.path.islink(p) or os.path.isfile(p):
        os.remove(p)


class Outputs:
    """The files one command writes, claimed before it starts.

        out = Outputs("mamba_next.py gates", force=args.force)
        out.claim([json_path, *figure_paths])        # refuses, or with force removes, earlier ones
        save_figure(fig, out.target(figure_path))     # recorded, then written

    key names the command (and the scope of its outputs, e.g. one model of a terrain stage):
    with force, the files recorded under the same key in the folders of the claimed paths are
    removed as well (an earlier run's figures that this run will not draw again), and nothing else.
    """

    def __init__(self, key: str | None, force: bool):
        self.key, self.force = key, force
        self.paths: list[str] = []

    def earlier(self, paths: list[str], folders: list[str] = ()) -> list[str]:
        """What exists of paths and of key's records in their folders (and in folders)."""
        cand = list(paths)
        folders = dict.fromkeys([os.path.dirname(os.path.abspath(p)) for p in paths] + list(folders))
        for folder in folders if self.key is not None else ():
            cand += recorded(self.key, folder)
        seen, out = set(), []
        for p in cand:
            a = os.path.abspath(p)
            if a not in seen and (os.path.isfile(p) or os.path.islink(p)):
                seen.add(a)
                out.append(p)
            elif a not in seen and os.path.isdir(p) and p in paths:
                raise InputError(f"{p} is a folder where this command writes a file; move it or choose another "
                                 f"output folder")
        return out

    def claim(self, paths: list[str], folders: list[str] = (), remove: bool = True,
              derived: list[str] = ()) -> list[str]:
        """Refuse (OutputsExist) when any of paths, or any file key recorded in their folders,
        exists; with force remove them (unless remove=False: the caller removes them later with
        `remove_earlier`). derived: other commands' outputs about what this command replaces (an
        analysis of the model it trains again), claimed and removed the same way although another
        key recorded them. Returns the earlier files."""
        derived_abs = {os.path.abspath(p) for p in derived}
        paths = list(dict.fromkeys(list(paths) + list(derived)))
        self.paths = list(paths)
        self.folders = list(folders)
        folder_set = dict.fromkeys([os.path.dirname(os.path.abspath(p)) for p in paths] + list(folders))
        remove_stale_temporaries(list(paths) + [_manifest_path(f) for f in folder_set])   # a killed writer's
        found = self.earlier(paths, folders)
        others = {p: recorded_by(p) - {self.key} for p in found
                  if self.key not in recorded_by(p) and os.path.abspath(p) not in derived_abs}
        theirs = next(((p, k) for p, k in others.items() if k), None)
        if theirs:   # another command of this project wrote it: never this command's to replace, --force or not
            raise OutputsExist(f"{theirs[0]} was written by another command ({sorted(theirs[1])[0]}); this command "
                               f"would replace it: choose another --out-dir / --plots-dir / --export")
        if found and not self.force:
            raise OutputsExist(f"{found[0]} exists ({len(found)} earlier output file(s) of this command); pass "
                               f"--force to replace them or choose another --out-dir / --plots-dir")
        if found and remove:
            self.remove_earlier(found)
        return found

    def remove_earlier(self, found: list[str]) -> None:
        keys = {p: ({self.key} if self.key is not None else set()) | recorded_by(p) for p in found}
        for p in found:
            _remove_file(p)
        for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in found):
            here = [p for p in found if os.path.dirname(os.path.abspath(p)) == folder]
            for key in sorted(set().union(*(keys[p] for p in here))):
                forget(key, folder, [p for p in here if key in keys[p]])

    def target(self, path: str) -> str:
        """Record path under the key, then return it for the writer."""
        if self.key is not None:
            record(self.key, [path])
        return path

    def write_json(self, path: str, obj, indent: int | None = 2) -> str:
        return write_json(self.target(path), obj, indent)


def recorded_keys(folder: str) -> list[str]:
    """The keys that recorded files in folder."""
    return list(_read_manifest(folder)) if os.path.isdir(folder) else []


def remove_recorded(key: str, folder: str) -> list[str]:
    """Remove every file key recorded in folder (those that exist) and its record; returns them."""
    gone = [p for p in recorded(key, folder) if os.path.isfile(p) or os.path.islink(p)]
    for p in gone:
        _remove_file(p)
    forget(key, folder)
    return gone


# ----------------------------------------------------------------------------- entry points

def _allocation_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text or "not enough memory" in text
        or "invalid buffer size" in text or "overflow" in text and "size" in text))


def error_line(e: BaseException) -> str | None:
    """The one line a command prints for an exception that is the user's to fix, or None for a bug."""
    if isinstance(e, OSError) and not isinstance(e, (InputError,)):
        name = e.filename if e.filename is not None else ""
        what = e.strerror or str(e)
        return f"{name}: {what}" if name else what
    if _allocation_failure(e):
        return f"not enough memory for the sizes asked for ({first_line(e, 160)}); use smaller sizes"
    if isinstance(e, RecursionError):
        return "an input is nested too deeply to be read"
    if isinstance(e, ValueError):
        return first_line(e, 2000)
    return None


def one_line_errors(*error_types: type):
    """Decorate main(argv) -> int: the given error types (the command's own), ValueError (InputError
    and every bad input), OSError (unreadable / unwritable paths), MemoryError and allocation
    failures, and RecursionError end with 'error: <one line>' on stderr and exit status 2.
    Anything else is a bug and keeps its traceback. SHOW_TRACEBACK=1 shows every traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print("error: interrupted", file=sys.stderr)
                return 130
            except Exception as e:  # noqa: BLE001 - sorted below: the user's to fix, or a bug
                if os.environ.get("SHOW_TRACEBACK"):
                    raise
                line = first_line(e, 2000) if isinstance(e, error_types) else error_line(e)
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr)
                return 2
        return run
    return wrap


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to limit characters (for 'cause' notes)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


if __name__ == "__main__":
    sys.exit("safeio.py is a module: the safe reading and writing every command uses")
