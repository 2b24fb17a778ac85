"""
The label file: a CSV naming each image, its label and optionally its patient and view, read into
prepare.py's items; every mistake in it is one line before any image is read. The classes and their
order (--classes, or the names, never guessed where a name reads both ways), one film per row.
"""
import csv
import re
import sys
from pathlib import Path

import radiographs as R
from folders import UserError

IMAGE_COLS = ("image", "file", "filename", "path", "image index")  # label-file columns, found by name
LABEL_COLS = ("label", "class", "diagnosis", "target")
PATIENT_COLS = ("patient", "patient_id", "patient id", "subject")
VIEW_COLS = ("view", "view position", "viewposition")
NORMAL_NAMES = {"normal", "no finding", "no_finding", "healthy", "negative", "no", "well", "control", "controls",
                "unaffected"}
NEGATION = re.compile(r"^(non|no|not|without)[-_ ]|[-_ ](negative|neg|free)$")  # non-TB, no_disease, TB-negative


def reads_healthy(name: str) -> bool:
    return name.lower() in NORMAL_NAMES or bool(NEGATION.search(name.lower()))


def read_table(path: Path) -> tuple:
    """(rows, columns) of a CSV: Excel's "CSV UTF-8" (a byte-order mark) and ;- or tab-separated files too."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte {e.start}); save it as 'CSV UTF-8' (Excel) or convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from None
    except OSError as e:
        raise UserError(f"{path}: not readable ({e.strerror or type(e).__name__})") from None
    if not text.strip():
        raise UserError(f"{path}: empty; give a CSV with a header and one row per image")
    delimiter = max(",;\t", key=text.splitlines()[0].count)
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    rows = list(reader)
    if not rows:
        raise UserError(f"{path}: a header and no rows; give one row per image")
    return rows, [c.strip() for c in reader.fieldnames or []]


def pick(cols, given, candidates, what, path, needed=True):
    if given:
        if given not in cols:
            raise UserError(f"{path}: no column {given!r} (columns: {', '.join(cols)})")
        return given
    found = next((c for c in cols if c.lower() in candidates), None)
    if found is None and needed:
        raise UserError(f"{path}: no {what} column found among {', '.join(cols)}; name it with --{what}-col")
    return found


def find_files(images: Path) -> dict:
    """{relative path: file} under --images, and {name: [relative paths]} to match a base name, or a name
    or relative path written without its extension."""
    files = {str(p.relative_to(images)): p for p in R.list_images([images])}
    by_name = {}
    for rel in files:
        for name in {Path(rel).name, Path(rel).stem, str(Path(rel).with_suffix(""))}:
            by_name.setdefault(name, []).append(rel)
    return files, {k: sorted(v) for k, v in by_name.items()}


def read_labels(opt) -> tuple:
    """(items, classes). Every label-file problem is an error before any work is done."""
    rows, cols = read_table(opt.labels)
    ic = pick(cols, opt.image_col, IMAGE_COLS, "image", opt.labels)
    lc = pick(cols, opt.label_col, LABEL_COLS, "label", opt.labels)
    pc = pick(cols, opt.patient_col, PATIENT_COLS, "patient", opt.labels, needed=False)
    vc = pick(cols, opt.view_col, VIEW_COLS, "view", opt.labels, needed=False)
    if not Path(opt.images).is_dir():
        raise UserError(f"--images {opt.images}: no such folder; give the folder that holds the images")
    files, by_name = find_files(Path(opt.images))
    items, seen, rows_of = [], set(), {}
    if pc and pc == lc:
        raise UserError(f"--patient-col {pc}: that is the label column; name the column of patient ids")
    for i, r in enumerate(rows, start=2):
        r = {k.strip() if k else k: v for k, v in r.items()}
        if not any((v or "").strip() for v in r.values() if isinstance(v, str)):
            continue  # an empty row (Excel writes them at the end)
        name, label = (r.get(ic) or "").strip(), (r.get(lc) or "").strip()
        if not label:
            raise UserError(f"{opt.labels}:{i}: missing label for {name!r}")
        if name in seen:
            raise UserError(f"{opt.labels}:{i}: duplicate row for {name!r}")
        seen.add(name)
        matches = [name] if name in files else by_name.get(name, [])
        if not matches:
            raise UserError(f"{opt.labels}:{i}: no file {name!r} under {opt.images}")
        if len(matches) > 1:
            raise UserError(f"{opt.labels}:{i}: {name!r} matches {' and '.join(matches[:2])} under {opt.images}: "
                            "give the relative path")
        same = rows_of.setdefault(files[matches[0]].resolve(), i)
        if same != i:
            raise UserError(f"{opt.labels}: lines {same} and {i} name the same file ({matches[0]!r}); keep one row")
        if "|" in label:  # several findings: one canonical order, so that equal sets are equal strings
            label = "|".join(sorted({x.strip() for x in label.split("|") if x.strip()}))
        column = lambda c: (r.get(c) or "").strip() if c else ""  # noqa: E731
        items.append(dict(path=files[matches[0]], rel=matches[0], label=label, line=i, patient=column(pc),
                          view=column(vc)))
    names = label_set(items, opt)
    check_patients(items, names, opt)
    return items, names


def check_patients(items: list, names: list, opt):
    """Before any work: two classes or more, and, where the label file names patients, enough patients of
    each class for every fold to hold one (check_folds checks the folds themselves at the end)."""
    if len(names) < 2 and not opt.multi_label:
        raise UserError(f"{opt.labels}: one class only ({names[0]!r}, {len(items)} images); a classifier needs two "
                        "or more")
    if all(it["patient"] for it in items):
        patients = {n: len({it["patient"] for it in items if has(it["label"], n)}) for n in names}
        few = {n: k for n, k in patients.items() if k < opt.folds}
        if few:
            raise UserError(f"{opt.labels}: {', '.join(f'{n!r} has {k} patient(s)' for n, k in few.items())}, fewer "
                            f"than --folds {opt.folds}: every fold needs one of each class; pass fewer --folds, or add "
                            "data")


def label_set(items: list, opt) -> list:
    """The classes, in order: --classes as given (unknown labels are an error listing their rows), or
    sorted with the normal class first; two spellings of one label are an error naming both."""
    opt.multi_label = opt.multi_label or any("|" in it["label"] for it in items)
    names = {x for it in items for x in (it["label"].split("|") if opt.multi_label else [it["label"]])}
    if opt.classes:
        declared = [c.strip() for c in opt.classes.split(",")]
        known = lambda x: x in declared or (opt.multi_label and x.lower() in NORMAL_NAMES)  # noqa: E731
        unknown = [it for it in items if not all(known(x) for x in it["label"].split("|"))]
        if unknown:
            lines = ", ".join(f"{it['line']} ({it['label']!r})" for it in unknown[:5])
            raise UserError(f"{opt.labels}: labels not in --classes {opt.classes!r} on {len(unknown)} row(s), "
                            f"e.g. line {lines}")
        classes = [c for c in declared if not (opt.multi_label and c.lower() in NORMAL_NAMES)]
        if len(classes) == 2 and not opt.multi_label and reads_healthy(classes[1]) and not reads_healthy(classes[0]):
            print(f"WARNING: --classes {opt.classes}: {classes[1]!r} is class 1, the positive class: every "
                  f"sensitivity, P(disease) and operating point will be of {classes[1]!r}, which reads as healthy; "
                  f"to make {classes[0]!r} the disease, pass --classes {classes[1]},{classes[0]}", file=sys.stderr)
        return classes
    negated = sorted(n for n in names if NEGATION.search(n.lower()) and n.lower() not in NORMAL_NAMES)
    if negated:
        order = ",".join(sorted(names, key=lambda n: n not in negated))
        raise UserError(f"{opt.labels}: labels {', '.join(map(repr, sorted(names)))}: {negated[0]!r} reads as a "
                        "negation, so which class is the disease cannot be told from the names; declare the order, "
                        f"healthy first, e.g. --classes {order}")
    spelled = {}
    for n in names:
        spelled.setdefault(" ".join(n.lower().split()), []).append(n)
    twins = [sorted(v) for v in spelled.values() if len(v) > 1]
    if twins:
        raise UserError(f"{opt.labels}: {' and '.join(repr(s) for s in twins[0])} differ only in case or spaces: "
                        "one class or two? Write it one way in the file")
    if opt.multi_label:  # classes are the findings; "normal" is none of them
        return sorted(n for n in names if n.lower() not in NORMAL_NAMES)
    order = lambda s: (int(s), s) if s.lstrip("-").isdigit() else (s.lower() not in NORMAL_NAMES, s)  # noqa: E731
    return sorted(names, key=order)  # numbers in order; else the normal class first


def has(label: str, name: str) -> bool:  # single-label: equality; multi-label: one of the findings
    return name in label.split("|")


def same_film(items: list, field: str, what: str, opt) -> list:
    """One film, one row: rows whose `field` (a keyed hash of the file, or of its decoded pixels) is equal
    are one film under two names. Other labels: refused, naming the label file's lines; the same label:
    the first row kept (one film must not count twice, nor sit in two folds under two patients)."""
    groups = {}
    for it in items:
        groups.setdefault(it[field], []).append(it)
    twins = [g for g in groups.values() if len(g) > 1]
    clash = [g for g in twins if len({it["label"] for it in g}) > 1]
    if clash:
        said = ", ".join(f"line {it['line']} ({it['label']!r})" for it in clash[0])
        raise UserError(f"{opt.labels}: {said} are one film ({what}) under different labels"
                        + (f", and {len(clash) - 1} more such group(s)" if len(clash) > 1 else "")
                        + "; keep one row per film with its true label")
    if twins:
        lines = "; ".join(" = ".join(str(it["line"]) for it in g) for g in twins[:5])
        print(f"WARNING: {sum(len(g) - 1 for g in twins)} row(s) of {opt.labels} repeat a film of another row "
              f"({what}, the same label): lines {lines}{' ..' if len(twins) > 5 else ''}; the first of each is "
              "kept", file=sys.stderr)
    dropped = {id(it) for g in twins for it in g[1:]}
    return [it for it in items if id(it) not in dropped]
