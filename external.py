"""
External validation: every film of another prepared folder that the run never saw, scored by one
fold's model or by the mean of the finished folds' (--ensemble), at the run's operating point carried
over, never chosen on the new site:

    python external.py --runs out/demo --fold 1 --data data/other_site [--classes 'healthy=normal']
    python external.py --runs out/demo --ensemble --data data/other_site

The report of eval.py (intervals over patients, the operating point, calibration, the pixel baseline
trained on the run's own patients), beside the run's own test fold, with warnings (an AUC interval
below chance, a cut-off calling nearly every film one way), and the shift between the sites'
acquisitions. Writes predictions.csv, eval.json and the curves in the run's
eval/external-<site>-<tag>/<rule>/ (--ensemble: <runs>/ensemble/external-<site>-<tag>/<rule>/).
"""
import hashlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np

import common as C
import metrics as M
import pneumollm as P
from folders import Data, UserError, cli, encode_labels, write_atomic
from report import baseline_model, draw_curves, figures, report, small
from runs import calls, eval_dir, folder_tag, operating_point, pct, read_run, results, write_predictions
from sites import external_films, shift


def external(runs: Path, opt) -> int:
    folds = finished_folds(runs, opt)
    cfg = C.read_config(runs / f"fold{folds[0]}")
    other, rows, labels, images = external_films(cfg, opt.data, opt.classes)
    y = encode_labels(labels, cfg["classes"], cfg["multi_label"])
    point = operating_point(runs / f"fold{folds[0]}", cfg, opt.sensitivity, [runs / f"fold{f}" for f in folds[1:]])
    if point["thresholds"]:
        point["rule"] = "carried over: " + point["rule"]
    scores = []
    for f in folds:
        model, run_cfg = C.load_run(runs / f"fold{f}", opt.device, True, opt.cpu_dtype)
        scores.append(C.predict(model, images, run_cfg, batch=16, progress=True))
    prob, x = np.mean(scores, 0), small(images)  # the baseline's pixels, from the images already read
    base = np.mean([baseline_model(C.read_config(runs / f"fold{f}"))[2](x) for f in folds], 0)
    out, draws = figures(y, prob, [r["patient"] for r in rows], cfg, point, base)
    out = dict(data=str(other.folder), folds=folds, classes_mapping=opt.classes,
               left_out_as_own=len(other.rows) - len(rows), **out, shift=shift(Data(cfg["data"]).meta, other.meta))
    mapping = f"-classes-{hashlib.sha256(opt.classes.encode()).hexdigest()[:6]}" if opt.classes else ""
    site = f"external-{other.folder.name}-{folder_tag(other.folder)}{mapping}"
    folder = results((runs / "ensemble" if opt.ensemble else eval_dir(runs / f"fold{folds[0]}")) / site, point)
    write_predictions(folder / "predictions.csv", [Path(r["image"]).stem for r in rows], prob, cfg, point,
                      [r["patient"] for r in rows], labels)
    write_atomic(folder / "eval.json", json.dumps(out, indent=1))
    draw_curves(folder, out, cfg, y, prob, draws, other.folder.name)
    what = f"{other.folder}, scored by " + (f"the mean of folds {folds}" if opt.ensemble else f"fold {folds[0]}")
    print(report(out, cfg, what))
    print("\n".join(beside_the_run(out, runs / f"fold{folds[0]}", cfg, y, prob, point)))
    print("\n".join(f"  shift in {k}: run {v['run']}, this data {v['data']}" for k, v in out["shift"].items()))
    if not cfg["multi_label"] and len(cfg["classes"]) == 2:
        probe = shlex.join(["python", "probe.py", "--runs", str(runs), "--fold", str(folds[0]), "--data",
                            str(other.folder), *(["--classes", opt.classes] if opt.classes else [])])
        print(f"  where the model reads on these films (the probe's occlusion grid): {probe}")
    print(f"wrote {', '.join(sorted(p.name for p in folder.iterdir()))} in {folder}")
    return 0


def finished_folds(runs: Path, opt) -> list:
    """--fold, or with --ensemble every finished fold; one experiment (common.check_same_runs)."""
    folds = [f for f in range(1, opt.folds + 1) if C.finished(runs / f"fold{f}")] if opt.ensemble else [opt.fold]
    if not folds:
        raise UserError(f"{runs}: no finished fold to score {opt.data} with; train one first")
    for f in folds:
        C.check_finished(runs / f"fold{f}", f)
    C.check_same_runs({f: C.read_config(runs / f"fold{f}") for f in folds})
    return folds


def beside_the_run(out: dict, run: Path, cfg: dict, y, prob, point: dict) -> list:
    """The external figures next to the run's own test fold (calibration, the share called positive),
    and warnings: an AUC interval below chance, a cut-off that calls nearly every film one way."""
    _, _, yt, pt = read_run(run, cfg["fold"])
    ml = cfg["multi_label"]
    here, there = M.calibration(y, prob, ml), M.calibration(yt, pt, ml)
    lines = [f"  beside the run's own test fold: Brier {here['brier']:.3f} (test fold {there['brier']:.3f}), "
             f"ECE {here['ece']:.3f} ({there['ece']:.3f})"]
    shares, tests = calls(prob, cfg, point).mean(0), calls(pt, cfg, point).mean(0)  # (C,) called positive
    for name, cut in point["thresholds"].items():
        share, test = shares[cfg["classes"].index(name)], tests[cfg["classes"].index(name)]
        lines.append(f"  {name}: called positive at P >= {cut:.3f}: {pct(share)} % of these films (test fold "
                     f"{pct(test)} %)")
        if max(share, 1 - share) >= 0.95:
            lines.append(f"WARNING: the carried-over cut-off calls {pct(max(share, 1 - share))} % of these films "
                         f"{'positive' if share >= 0.5 else 'negative'} for {name}: it does not carry over to this "
                         "site; choose one on labelled films from it")
    lo, hi = out["paper"]["ci95"]["auc"]
    if hi < 0.5:
        lines.append(f"WARNING: the AUC's interval [{pct(lo)}, {pct(hi)}] lies below 0.5: the model ranks these "
                     "films backwards. Are the labels or --classes reversed? If not, it reads something that "
                     "flips between the sites")
    elif out["paper"]["metrics"]["auc"] < 0.5:
        lines.append(f"NOTE: the AUC {pct(out['paper']['metrics']['auc'])} is below 0.5 (its interval holds chance): "
                     "if the labels or a --classes mapping are reversed, every figure here is of the other class")
    base = out["baseline"]
    if base["auc_ci95"][1] < 0.5:
        lines.append(f"WARNING: the pixel baseline's AUC interval [{pct(base['auc_ci95'][0])}, "
                     f"{pct(base['auc_ci95'][1])}] lies below 0.5 too: what tells the classes apart in the run's "
                     "pixels is reversed here (another scanner, exposure or framing)")
    elif base["auc"] < 0.5:
        lines.append(f"NOTE: the pixel baseline's AUC {pct(base['auc'])} is below 0.5 here: the run's pixel "
                     "cues do not carry over to this site")
    return lines


def parser():
    ap = C.scoring_flags(__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="another prepared folder to score (external validation)")
    ap.add_argument("--ensemble", action="store_true", help="the mean probability of the finished folds")
    ap.add_argument("--folds", type=int, default=5, help="how many folds --ensemble looks for")
    ap.add_argument("--classes", help="map --data's label names to the run's, e.g. 'healthy=normal,silicosis="
                    "pneumoconiosis'")
    return ap


def main(argv=None):
    opt = C.scoring_options(parser(), argv)
    return external(Path(opt.runs), opt)


if __name__ == "__main__":
    sys.exit(cli(main, (P.CheckpointError,)))
