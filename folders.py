"""
The data folder's contract, shared by prepare.py (which writes it), train.py and eval.py (which read
it): its rows (manifest.csv, meta.json), the patient-level folds, the run's split rule, one-line
errors, and files replaced whole or not at all. numpy only: neither torch nor pydicom.

A data folder (data/<name>/) holds images/<pseudonym>.png, manifest.csv (image, label, patient,
fold, crop), meta.json (settings, classes, counts, the shortcut audit) and records.jsonl.
"""
import argparse
import csv
import errno
import io
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


class UserError(Exception):
    """A mistake in the user's input (a file, a flag): the scripts print its one line and exit with 2."""


class Interrupted(Exception):
    """Ctrl-C, with what was kept and how to go on: one line, exit status 130."""


def cli(main, errors=()):
    """Run a script's main; a mistake in the user's input (UserError, or one of `errors`) or a file the
    system refuses (permissions, a full disk) is one line on stderr and exit status 2; Ctrl-C is one
    line and 130."""
    try:
        rc = main()
        return rc if isinstance(rc, int) else 0
    except (UserError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


@contextmanager
def locked(folder: Path, who: str):
    """Holds folder/.lock (this process's id) while the block runs. A second command on the same folder
    is refused in one line naming the process that holds it; a lock left by a process that died is
    cleared."""
    lock = Path(folder) / ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        text = lock.read_text().strip()
        pid = int(text) if text.isdigit() else 0
        if pid and pid_alive(pid):
            raise UserError(f"{folder} is in use by another {who} (process {pid}); wait for it, or use another "
                            "folder") from None
        lock.unlink()  # left by a run that died
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Help(argparse.HelpFormatter):
    """Each flag's default once, where it has one; none where the help already says it or there is none."""

    def _get_help_string(self, action):
        if "(default" in action.help or action.default in (None, False, "", argparse.SUPPRESS):
            return action.help
        return action.help + " (default: %(default)s)"


@contextmanager
def replacing(path: Path):
    """Yields a temporary path beside `path`; when the block ends without an error, it replaces `path`
    at once (a kill leaves the old file or the new one, never half of one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException as e:  # nothing half-written is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and "write" in str(e):  # torch.save's writer on a full disk
            raise OSError(errno.EIO, f"could not be written ({str(e).splitlines()[0][:120]}); is the disk full?",
                          str(path)) from None
        raise
    os.replace(tmp, path)


def write_atomic(path: Path, text: str):
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_csv(path: Path, header, rows) -> str:
    """Every CSV this project writes, replaced whole; a field with a comma or a quote is quoted (a file
    or label name can hold one). Returns the text."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    write_atomic(path, text.getvalue())
    return text.getvalue()


def make_folds(patients: list, labels: list, k: int, seed: int, multi_label=False) -> list:
    """Stratified k folds grouped by patient: shuffled patients, largest first, each into the fold where
    it adds least to the sum over folds and columns of (the fold's share of the column)^2, that is,
    where its own labels are least represented so far. No patient is ever in two folds. Multi-label sets
    (findings written a|b; "" or a normal name is a column too) balance every finding and the images,
    not the combinations, which are too many and too rare to balance."""
    atoms = (lambda y: y.split("|")) if multi_label else (lambda y: [y])  # noqa: E731
    classes = sorted({a for y in labels for a in atoms(y)})
    groups = {}
    for p, y in zip(patients, labels):
        v = groups.setdefault(p, np.zeros(len(classes) + multi_label))
        v[[classes.index(a) for a in atoms(y)]] += 1
        v[-1] += multi_label  # the images
    order = list(groups)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda p: -groups[p].sum())
    total = np.maximum(sum(groups.values()), 1)
    counts, fold_of = np.zeros((k, len(total))), {}
    for p in order:
        cost = (((counts + groups[p]) / total) ** 2 - (counts / total) ** 2).sum(1) + 1e-9 * np.arange(k)
        fold_of[p] = int(np.argmin(cost))
        counts[fold_of[p]] += groups[p]
    return [fold_of[p] + 1 for p in patients]


def encode_labels(labels: list, classes: list, multi_label: bool) -> np.ndarray:
    """Class indices (N,), or multi-hot (N, C) for multi-label sets (findings written a|b)."""
    if multi_label:
        hot = [[c in label.split("|") for c in classes] for label in labels]
        return np.array(hot, np.float32).reshape(-1, len(classes))
    return np.array([classes.index(label) for label in labels], np.int64)


def changed(old: dict, new: dict, ignore=()) -> list:
    """The settings (keys) whose values differ between what a folder holds (`old`) and this command (`new`)."""
    return [k for k in sorted(set(old) | set(new)) if k not in ignore and str(old.get(k)) != str(new.get(k))]


def refuse_changed(folder: Path, what: str, old: dict, new: dict, keys: list, redo: str):
    """One refusal for a folder made with other settings than this command's, naming the first four."""
    if keys:
        said = "; ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:4])
        raise UserError(f"{folder} {what} with other settings ({said}): pass another --out, or --restart to {redo}")


def positive_class(classes: list, multi_label: bool) -> str:
    """What a line of sensitivity, specificity and AUC is about, in words that go on the line."""
    if multi_label:
        return f"each of the {len(classes)} findings, macro-averaged"
    if len(classes) == 2:
        return f"of {classes[1]!r} (positive) against {classes[0]!r}"
    return f"each of the {len(classes)} classes against the rest, macro-averaged"


def lacking(y: np.ndarray, n_classes: int, multi_label: bool) -> np.ndarray:
    """(C,) bool: the classes that labels y (encode_labels') cannot score: no image of a class; for a
    finding (multi-label), no image with it or none without it."""
    if multi_label:
        return (y.min(0) == 1) | (y.max(0) == 0) if len(y) else np.ones(n_classes, bool)
    return np.bincount(y, minlength=n_classes) == 0


class Data:
    """A prepared data folder: its rows, classes and folds, the split of a fold, its images."""

    def __init__(self, folder):
        self.folder = Path(folder)
        for name in ("manifest.csv", "meta.json"):
            if not (self.folder / name).exists():
                raise UserError(f"{self.folder / name} not found: prepare the data first (python prepare.py "
                                f"--demo, or --images/--labels/--out {self.folder})")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.classes, self.multi_label = self.meta["classes"], self.meta.get("multi_label", False)
        with open(self.folder / "manifest.csv", newline="") as f:
            self.rows = list(csv.DictReader(f))
        self.folds = sorted({int(r["fold"]) for r in self.rows})

    def order_note(self) -> str:
        """A line for folders whose class order came from the label names (no --classes): which class the
        figures treat as the disease."""
        if self.meta.get("settings", {}).get("classes") or self.multi_label or len(self.classes) != 2:
            return ""
        return (f"NOTE: {self.folder} did not declare its classes: {self.classes[1]!r} is taken as the disease "
                f"(the positive class), {self.classes[0]!r} as healthy, from the names; if that is backwards, "
                f"prepare it again with --classes {self.classes[1]},{self.classes[0]} --restart")

    def images(self, rows, column="image") -> np.ndarray:  # (N, 1, H, W) uint8
        if not rows:  # e.g. the validation split of --val-frac 0
            return np.zeros((0, 1, 0, 0), np.uint8)
        return np.stack([np.asarray(Image.open(self.folder / r[column]).convert("L")) for r in rows])[:, None]

    def rows_of(self, predictions: list) -> list:
        """The manifest rows of predictions.csv's rows, which name each image by its pseudonym alone."""
        by_name = {Path(r["image"]).stem: r for r in self.rows}
        return [by_name[p["image"]] for p in predictions]

    def labels(self, rows) -> np.ndarray:
        return encode_labels([r["label"] for r in rows], self.classes, self.multi_label)

    def split(self, fold: int, val_frac=0.1, seed=20) -> dict:
        """{'train', 'val', 'test': rows}; val is carved from the training patients, by patient."""
        if fold not in self.folds:
            raise UserError(f"--fold {fold}: {self.folder}/manifest.csv has folds {self.folds}")
        test = [r for r in self.rows if int(r["fold"]) == fold]
        rest = [r for r in self.rows if int(r["fold"]) != fold]
        out = {"test": test, "train": rest, "val": []}
        if val_frac > 0:
            k = max(2, round(1 / val_frac))  # inner folds; the first is the validation split
            inner = make_folds([r["patient"] for r in rest], [r["label"] for r in rest], k, seed, self.multi_label)
            out["train"] = [r for r, f in zip(rest, inner) if f != 1]
            out["val"] = [r for r, f in zip(rest, inner) if f == 1]
        seen = {r["patient"] for r in out["train"] + out["val"]}
        assert not seen & {r["patient"] for r in test}, "a test patient is in the training data"
        return out

    def check_run(self, cfg: dict, run):
        """A run pins the data folder it was trained on (its fingerprint): refuse it on changed data."""
        if cfg.get("data_fingerprint") != self.meta.get("fingerprint"):
            raise UserError(f"{self.folder} changed since {run} was trained on it (prepared again: other images, "
                            "labels or folds), so its test fold may hold training patients; train the run again "
                            "(train.py --restart, or another --out), or prepare the new data into another folder")

    def run_split(self, cfg: dict) -> dict:
        """The split a run trains on, from its config, and 'select': the rows its epoch is chosen on, the
        validation split; with --authors-code (select "test"), the test fold, and no validation split."""
        split = self.split(cfg["fold"], 0 if cfg["select"] == "test" else cfg["val_frac"], cfg["seed"])
        return split | {"select": split["test"] if cfg["select"] == "test" else split["val"]}

    def check_split(self, split: dict, cfg: dict):
        """Before any training: the metrics that choose the epoch need every class in the split they are
        computed on (the validation split; the test fold with --select test)."""
        parts = {"train": split["train"]} | ({cfg["select"]: split["select"]} if cfg["select"] != "last" else {})
        for part, rows in parts.items():
            y = self.labels(rows)
            missed = lacking(y, len(self.classes), self.multi_label)
            if missed.any():
                what = "images with and without" if self.multi_label else "images of"
                missing = ", ".join(c for c, m in zip(self.classes, missed) if m)
                hint = "raise --val-frac or pass --select last" if part == "val" else "check the data folder's labels"
                raise UserError(f"the {part} split of fold {cfg['fold']} ({len(y)} images) has no {what} {missing}: "
                                + hint)
