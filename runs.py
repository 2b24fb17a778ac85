"""
A finished run as eval's scripts read it (eval.py, probe.py, external.py, score.py): its config and
predictions, its data folder, the operating point and the one rule of a call at it, the one writer of
predictions (train.py's too), and where results go: the run's eval/ folder, a subfolder per rule.
"""
import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np

import common as C
import metrics as M
from folders import Data, UserError, encode_labels, write_csv


def read_predictions(path: Path, cfg: dict) -> tuple:  # (rows, labels, probabilities (N, C))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    prob = np.array([[float(r[f"p_{c}"]) for c in cfg["classes"]] for r in rows]).reshape(len(rows), -1)
    return rows, encode_labels([r["label"] for r in rows], cfg["classes"], cfg["multi_label"]), prob


def read_run(run: Path, fold: int) -> tuple:
    """(config, predictions.csv rows, labels, probabilities) of a finished run."""
    C.check_finished(run, fold)
    cfg = C.read_config(run)
    return (cfg, *read_predictions(run / "predictions.csv", cfg))


def run_data(cfg: dict) -> Data:  # the run's data folder, refused if it changed since the run was trained
    data = Data(cfg["data"])
    data.check_run(cfg, cfg["out"])
    return data


def operating_point(run: Path, cfg: dict, sensitivity=None, more=(), saved=True) -> dict:
    """Thresholds chosen on the run's validation predictions (pooled with those of the runs `more`: an
    ensemble's folds), never on the test fold, except for a run that chose its epoch there
    (--authors-code: said in the rule). One rule for every script: eval.py --fold (and --all) chooses
    it, Youden's J or --sensitivity, and saves it in eval/operating_point.json; score.py, probe.py and
    external.py apply the saved rule (`saved`) unless given --sensitivity, always to the predictions as
    they are now. `tag` names the rule, and the folder its results go to. A run trained with a
    validation split and missing its predictions is refused, never given 0.5."""
    if not cfg["multi_label"] and len(cfg["classes"]) > 2:
        return dict(rule="argmax (multi-class: no threshold)", sensitivity=None, thresholds={}, tag="argmax")
    names = cfg["classes"] if cfg["multi_label"] else cfg["classes"][1:]
    file = eval_dir(run) / "operating_point.json"
    if sensitivity is None and saved and file.exists():
        sensitivity = json.loads(file.read_text()).get("sensitivity")
        how = f" (saved by eval.py --fold {cfg['fold']}: {file.name})"
    else:
        how = "" if sensitivity is None else " (--sensitivity)"
    on = "test" if cfg["select"] == "test" else "validation" if cfg["val_frac"] > 0 else None
    if on is None:
        return dict(rule="0.5 (the run has no validation split to choose a threshold on)", sensitivity=None,
                    thresholds={c: 0.5 for c in names}, tag="0.5")
    source = "val_predictions.csv" if on == "validation" else "predictions.csv"
    for r in (run, *more):
        if not (r / source).exists():
            raise UserError(f"{r / source}: missing, though the run held out --val-frac {cfg['val_frac']} of its "
                            "patients to choose its threshold on; restore the file, or train the run again with the "
                            "same train.py command and --restart")
    yv, pv = (np.concatenate(v) for v in zip(*[read_predictions(r / source, cfg)[1:] for r in (run, *more)]))
    findings = M.as_binary(yv, pv, cfg["multi_label"])
    thresholds = {n: M.choose_threshold(y, s, sensitivity) for n, (_, y, s) in zip(names, findings)}
    youden = {n: sum(M.at_threshold(y, s, thresholds[n])[k] for k in ("sensitivity", "specificity")) - 1
              for n, (_, y, s) in zip(names, findings)}
    chance = [f"{n} (J {v:.2f})" for n, v in youden.items() if not v > 0]
    warn = f"; WARNING: no cut-off beats chance there for {', '.join(chance)}" if chance else ""
    where = "the validation split" if on == "validation" else "the TEST FOLD (the authors' code: optimistic)"
    rule = ("Youden's J" if sensitivity is None else f"sensitivity >= {sensitivity}") + how
    tag = ("youden" if sensitivity is None else f"sensitivity-{sensitivity:g}") + ("-on-test" if on == "test" else "")
    return dict(rule=f"{rule} on {where} ({len(yv)} images){warn}", sensitivity=sensitivity, thresholds=thresholds,
                tag=tag)



def calls(prob, cfg: dict, point: dict) -> np.ndarray:  # (..., C) probabilities -> (..., C) bool
    """The one rule of a call at the run's operating point: a class with a threshold is called where its
    probability is >= the threshold; a class without one (multi-class runs: every class) never is."""
    return np.asarray(prob) >= np.array([point["thresholds"].get(c, np.inf) for c in cfg["classes"]])


def decision(prob, cfg: dict, point: dict) -> str:  # at the run's thresholds; multi-class: the argmax
    if not point["thresholds"]:
        return cfg["classes"][int(np.argmax(prob))]
    found = [c for c, on in zip(cfg["classes"], calls(prob, cfg, point)) if on]
    return "|".join(found) if cfg["multi_label"] else (found[0] if found else cfg["classes"][0])


def called(prob, cfg: dict, point: dict):  # binary: the class called at the run's threshold; else None (argmax)
    if cfg["multi_label"] or len(cfg["classes"]) != 2:
        return None
    return int(calls(prob, cfg, point)[1])


def describe(prob, cfg: dict, point: dict) -> str:
    if not point["thresholds"]:  # multi-class: the argmax
        each = ", ".join(f"P({c}) = {q:.3f}" for c, q in zip(cfg["classes"], prob))
        return f"{each}: {cfg['classes'][prob.argmax()]}"
    words, on = [], calls(prob, cfg, point)
    for name, cut in point["thresholds"].items():
        k = cfg["classes"].index(name)
        words.append(f"P({name}) = {prob[k]:.3f}, {'positive' if on[k] else 'negative'} at the run's threshold "
                     f"{cut:.3f} ({point['rule'].split(' on the ')[0]})")
    return "; ".join(words)


def write_predictions(path: Path, names: list, prob, cfg: dict, point=None, patients=None, labels=None):
    """The one writer of predictions: a row per image named by its pseudonym (or image<N> for new
    files, whose names can name a patient), its patient and label where known, each class's probability,
    and the call: at the operating point `point`, else the paper's (the argmax; P > 0.5 per finding)."""
    known = [c for c, v in (("patient", patients), ("label", labels)) if v is not None]
    paper = dict(thresholds={c: 0.5 for c in cfg["classes"]} if cfg["multi_label"] else {})
    write_csv(path, ["image", *known, *(f"p_{c}" for c in cfg["classes"]), "decision"],
              [[n, *(v[i] for v in (patients, labels) if v is not None), *(f"{q:.6f}" for q in p),
                decision(p, cfg, point or paper)] for i, (n, p) in enumerate(zip(names, prob))])


EARLIER = ("eval.json", "operating_point.json", "roc*.png", "reliability*.png", "probe*.json", "probe*.png",
           "explain.png", "image_scores*.csv", "last.safetensors")  # what earlier versions wrote beside a run's files


def eval_dir(run: Path) -> Path:
    """Where eval's scripts write into a run: one folder, which train.py --restart removes whole."""
    return run / "eval"


def results(folder: Path, point: dict) -> Path:
    """folder/<the operating point's tag>: the results of another rule go beside, never over, these."""
    out = folder / point["tag"]
    out.mkdir(parents=True, exist_ok=True)
    return out


def confusion(m: dict, cfg: dict) -> str:  # the confusion matrix's line, with its layout
    layout = "per finding [[tn, fp], [fn, tp]]" if cfg["multi_label"] else "rows true, cols predicted"
    return f"confusion ({layout}, {cfg['classes']}): {m['confusion']}"



def writable(folder):
    """A folder that results will be written into, checked before the work that makes them."""
    if folder is not None and not os.access(folder, os.W_OK):
        raise UserError(f"{folder}: not writable, and the results go there; make it writable, or copy the run "
                        "folder somewhere writable")


def fresh(path: Path) -> Path:  # path, else path-2, path-3, ..: each command's results beside the earlier ones
    k = 1
    while (p := path if k == 1 else path.with_name(f"{path.stem}-{k}{path.suffix}")).exists():
        k += 1
    return p


def folder_tag(folder: Path) -> str:  # a short tag of a folder's full path, to name the output folder
    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]


def pct(v) -> str:
    return f"{100 * v:.1f}"
