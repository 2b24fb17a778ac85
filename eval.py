"""
The paper's figures for finished runs, from the predictions.csv that train.py writes; no model is
rebuilt (except for --explain's maps):

    python eval.py --runs out/demo --fold 1    # fold 1's test set: the figures, and the operating point
    python eval.py --runs out/demo --all       # every finished fold as the paper's Table 2 (markdown + JSON)
    python eval.py --runs out/demo --fold 1 --explain 8   # Grad-CAM maps of 8 test images (TP, FP, FN, TN)

- The paper's figures, unchanged: sensitivity (recall of disease), specificity, accuracy, ROC AUC
  and AVG (their mean) at the argmax, for comparison with Table 2; each line names the positive class.
- An operating point chosen on the run's validation split, never on the test fold: Youden's J, or
  the highest threshold reaching --sensitivity there. It is applied unchanged to the test fold:
  sensitivity, specificity, accuracy, PPV, NPV and F1. Multi-label sets get one threshold per finding
  (one-vs-rest), macro-averaged; multi-class sets keep the argmax.
- Calibration: Brier score and expected calibration error (15 equal-width bins of the predicted
  probability of each class: of disease in the binary case), reliability.png; --calibrate fits a
  temperature on validation and reports both.
- 95 % intervals resample patients, not images (one patient's images are not independent).
- A baseline to beat: logistic regression on the 32x32 grey image, trained on exactly the run's
  training patients; its AUC, and the paired difference, next to the model's.

Results go to the run's eval/<rule>/ (--all: <runs>/table/<rule>/): another rule writes beside them.
Other tools: score.py (new images), probe.py (where the model reads), external.py (another site).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import common as C
import explain
import metrics as M
import plots
import pneumollm as P
from folders import Data, UserError, cli, positive_class, write_atomic
from report import baseline, draw_curves, figures, report
from runs import calls, eval_dir, operating_point, pct, read_predictions, read_run, results, run_data, writable

MOVED = {"--image": "score.py", "--csv": "score.py", "--save-crops": "score.py", "--explain-dir": "score.py",
         "--probe": "probe.py", "--data": "external.py (probe.py --data for the probe)", "--ensemble": "external.py",
         "--classes": "external.py or probe.py"}


def evaluate(run: Path, fold: int, opt) -> dict:
    """Everything about one finished fold, as eval.json holds it."""
    cfg, rows, y, prob = read_run(run, fold)
    point = operating_point(run, cfg, opt.sensitivity, saved=False)
    eval_dir(run).mkdir(exist_ok=True)
    write_atomic(eval_dir(run) / "operating_point.json", json.dumps(point, indent=1))
    pb = baseline(cfg, rows)
    out, draws = figures(y, prob, [r["patient"] for r in rows], cfg, point, pb)
    if opt.calibrate and cfg["val_frac"] > 0:
        ml, (_, yv, pv) = cfg["multi_label"], read_predictions(run / "val_predictions.csv", cfg)
        temp = M.fit_temperature(yv, pv, ml)
        out["calibration"].update(temperature=temp, calibrated=M.calibration(y, M.with_temperature(prob, temp, ml), ml))
    return dict(dict(fold=fold, **out), _curves=(cfg, y, prob, draws, pb))


def eval_fold(runs: Path, fold: int, opt) -> dict:
    run = runs / f"fold{fold}"
    out = evaluate(run, fold, opt)
    cfg, y, prob, draws, _ = out.pop("_curves")
    if note := Data(cfg["data"]).order_note():
        print(note)
    print(report(out, cfg, f"fold {fold}, test"))
    point = out["operating_point"]
    folder = results(eval_dir(run), dict(point, tag=point["tag"] + "-calibrated" * opt.calibrate))
    write_atomic(folder / "eval.json", json.dumps(out, indent=1))
    draw_curves(folder, out, cfg, y, prob, draws, f"fold {fold}")
    print(f"wrote {', '.join(sorted(p.name for p in folder.iterdir()))} in {folder}; the operating point that "
          f"score.py, probe.py and external.py apply: {eval_dir(run) / 'operating_point.json'}")
    return out


def table(runs: Path, opt) -> int:
    done = [f for f in range(1, opt.folds + 1) if C.finished(runs / f"fold{f}")]
    missing = [f for f in range(1, opt.folds + 1) if f not in done]
    if not done:
        raise UserError(f"{runs}: no finished fold among fold1..fold{opt.folds}; train them with "
                        f"python train.py --data DIR --fold N --out {runs}/foldN")
    C.check_same_runs({f: C.read_config(runs / f"fold{f}") for f in done})
    per = {f: evaluate(runs / f"fold{f}", f, opt) for f in done}
    folder = results(runs / "table", dict(tag=next(iter(per.values()))["operating_point"]["tag"]))
    vals = 100 * np.array([[o["paper"]["metrics"][k] for k in M.METRICS] + [o["baseline"]["auc"]]
                           for o in per.values()])
    sd = vals.std(0, ddof=1) if len(done) > 1 else np.full(vals.shape[1], np.nan)
    cfg = next(iter(per.values()))["_curves"][0]
    lines = [f"Sensitivity, specificity and AUC {positive_class(cfg['classes'], cfg['multi_label'])}.\n",
             "| fold | Sens. | Spec. | Acc. | AUC | AVG | baseline AUC |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {f} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for f, row in zip(per, vals)]
    lines.append("| mean ± sd | " + " | ".join(f"{mu:.2f} ± {s:.2f}" if len(done) > 1 else f"{mu:.2f}"
                                           for mu, s in zip(vals.mean(0), sd)) + " |")
    pooled = pool(folder, per)
    lines.append(f"\npooled over {len(done)} fold(s): AUC {pct(pooled['auc'])} (model), "
                 f"{pct(pooled['baseline_auc'])} (baseline: logistic regression on 32x32 pixels, same patients)")
    lines += [f"fold {f}: {o['baseline']['verdict']}" for f, o in per.items()]
    if missing:
        lines.append(f"not finished, left out: fold {', '.join(map(str, missing))}")
    text = "\n".join(lines)
    print(text)
    write_atomic(folder / "table.md", text + "\n")
    folds = {f: {k: v for k, v in o.items() if k != "_curves"} for f, o in per.items()}
    summary = dict(folds=folds, missing=missing, mean=dict(zip([*M.METRICS, "baseline_auc"], vals.mean(0))),
                   pooled=pooled)
    write_atomic(folder / "table.json", json.dumps(summary, indent=1))
    print(f"wrote table.md, table.json, roc.png in {folder}")
    return 0


def pool(folder: Path, per: dict) -> dict:
    """Every fold's test predictions together (the model's and the baseline's): pooled AUCs, and roc.png
    with each fold's curve (binary: disease; multi-label: the first finding)."""
    curves, ys, scores, base = [], [], [], []
    for f, o in per.items():
        cfg, y, prob, _, pb = o["_curves"]
        model_and_baseline = zip(M.as_binary(y, prob, cfg["multi_label"])[:1], M.as_binary(y, pb, cfg["multi_label"]))
        for (_, yb, s), (_, _, b) in model_and_baseline:
            curves.append((f"fold {f}", *M.roc_curve(yb, s)[:2]))
            ys, scores, base = ys + [yb], scores + [s], base + [b]
    if not ys:
        return dict(auc=float("nan"), baseline_auc=float("nan"))
    y, s = np.concatenate(ys), np.concatenate(scores)
    auc = M.roc_auc(y, s)
    pooled = (f"pooled: AUC {auc:.3f}", *M.roc_curve(y, s)[:2])
    plots.draw_roc(folder / "roc.png", curves + [pooled], "every fold's ROC, and pooled")
    return dict(auc=auc, baseline_auc=M.roc_auc(y, np.concatenate(base)))


def explain_fold(runs: Path, opt) -> int:
    """explain.png in the run's eval/<rule>/: K test images (true and false positives and negatives, taken in
    turn), each under the map of the class called at the run's threshold, captioned with its outcome,
    probability and pseudonym."""
    run = runs / f"fold{opt.fold}"
    cfg, rows, y, prob = read_run(run, opt.fold)
    writable(run)
    point = operating_point(run, cfg, opt.sensitivity)
    if cfg["multi_label"] or len(cfg["classes"]) != 2:
        raise UserError("--explain shows true/false positives/negatives: binary runs only; score.py --image "
                        "--explain maps any run's images")
    positive = calls(prob, cfg, point)[:, 1]
    kinds = {"TP": (y == 1) & positive, "FP": (y == 0) & positive, "FN": (y == 1) & ~positive,
             "TN": (y == 0) & ~positive}
    queues = {k: list(np.flatnonzero(m)) for k, m in kinds.items()}
    chosen = []
    while len(chosen) < opt.explain and any(queues.values()):
        chosen += [(k, q.pop(0)) for k, q in queues.items() if q][:opt.explain - len(chosen)]
    model, cfg = C.load_run(run, opt.device, True, opt.cpu_dtype)
    data = run_data(cfg)
    images = torch.from_numpy(data.images(data.rows_of([rows[i] for _, i in chosen])))
    heats, _, weights = explain.explain_images(model, images, cfg, [int(positive[i]) for _, i in chosen])
    tiles = [plots.overlay(img, heat, f"{kind} P={prob[i, 1]:.2f} {rows[i]['image'][:10]}\n"
                                      f"map of {cfg['classes'][int(positive[i])]}")
             for (kind, i), img, heat in zip(chosen, images[:, 0].numpy(), heats)]
    path = results(eval_dir(run), point) / "explain.png"
    plots.sheet(tiles).save(path)
    print(f"{path}: {len(tiles)} test images ({', '.join(k for k, _ in chosen)}) under their Grad-CAM maps")
    if weights is not None:
        print(explain.describe_weights(weights, model.visual.cls_blocks))
    return 0


def parser():
    ap = C.scoring_flags(__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every finished fold of 1..--folds, as the paper's Table 2")
    ap.add_argument("--folds", type=int, default=5, help="how many folds --all expects")
    ap.add_argument("--calibrate", action="store_true", help="also fit a temperature on validation; report both")
    ap.add_argument("--explain", nargs="?", type=int, const=8, metavar="K", help="Grad-CAM maps (explain.py) of K test "
                    "images of --fold")
    return ap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    moved = [a for a in argv if a.split("=")[0] in MOVED]
    if moved:
        flag = moved[0].split("=")[0]
        raise UserError(f"eval.py {flag} moved to python {MOVED[flag]} (the same flags; --help lists them)")
    opt = C.scoring_options(parser(), argv, model=False)
    if opt.explain is not None and opt.explain < 1:
        raise UserError(f"--explain {opt.explain}: give how many test images to explain, 1 or more")
    if opt.explain is not None and (opt.all or opt.calibrate):
        raise UserError("--explain maps one fold's test images; it cannot go with "
                        + ("--all" if opt.all else "--calibrate"))
    runs = Path(opt.runs)
    if opt.all:
        return table(runs, opt)
    if opt.explain is not None:
        C.apply_threads(opt.threads)  # the only one of eval.py's commands that runs the model
        return explain_fold(runs, opt)
    eval_fold(runs, opt.fold, opt)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main, (P.CheckpointError,)))
