"""
Where the model reads: the test fold (or with --data DIR every film of another site the run never
saw) scored again by the run's model, every arm by the same model in the same dtype:

    python probe.py --runs out/demo --fold 1                   # the run's test fold
    python probe.py --runs out/demo --fold 1 --data data/other  # another site's films

(a) each cell of an 8 x 8 grid over the crop in turn replaced by the mean of the probed films there
(the same pixels for every film: it hides what differs between films, and leaves no grey patch for
the model to react to): the AUC drop per cell with its patient interval, and how much of each cell
lies outside the lung fields (lungcrop.lung_fields: the lung masks, or approximate ellipses); (b) the
lung fields hidden whole; (c) the reference framing where the run was cropped otherwise. A verdict
that must hold with the lung fields grown and shrunk by 3 % of the crop, else "inconclusive".
Writes probe.json and probe.png (the drops over the mean crop, the lung fields outlined) in the run's
eval/probe[-<site>]/<rule>/.
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import common as C
import metrics as M
import plots
import pneumollm as P
from folders import UserError, cli, encode_labels, write_atomic
from lungcrop import lung_fields
from runs import calls, eval_dir, folder_tag, operating_point, pct, read_run, results, run_data, writable
from sites import external_films


def probe(runs: Path, opt) -> int:
    run = runs / f"fold{opt.fold}"
    cfg, rows, y, _ = read_run(run, opt.fold)
    writable(run)
    if cfg["multi_label"] or len(cfg["classes"]) != 2:
        raise UserError("probe.py compares the disease score of binary runs; this run has classes "
                        f"{cfg['classes']}{' (multi-label)' if cfg['multi_label'] else ''}")
    point = operating_point(run, cfg, opt.sensitivity)
    if opt.data:  # another site's folder: all of it but the run's own films, labels in the run's names
        data, test, labels, images = external_films(cfg, opt.data, opt.classes)
        y, name = encode_labels(labels, cfg["classes"], False), f"probe-{data.folder.name}-{folder_tag(data.folder)}"
    else:
        data, name = run_data(cfg), "probe"
        test = data.rows_of(rows)
        images = data.images(test)
    model, cfg = C.load_run(run, opt.device, True, opt.cpu_dtype)
    draws = M.resamples([r["patient"] for r in test], y, 2)  # as eval's: one interval for one AUC
    fields, what = lung_fields_of(data, test, images.shape[-1])
    scores, mean = arms(model, cfg, data, test, images, fields[0.0])
    out = dict(fold=opt.fold, images=len(y), threshold=point["thresholds"][cfg["classes"][1]],
               intervals=f"95 %, {len(draws)} resamples of patients", lung_fields=dict(
                   what=what, share_of_crop=float(fields[0.0].mean())),
               scored_with=dict(device=cfg["device"], dtype=cfg["dtype"], cpu=cfg.get("cpu_scoring")))
    for arm, s in scores.items():
        out[arm] = arm_figures(s, y, draws, cfg, point, arm)
    out["occlusion"] = occlusion(model, images, mean, scores["as trained"], cfg, y, draws, fields)
    out["verdict"] = probe_verdict(out, y, scores, draws)
    print("\n".join(out["verdict"]))
    write(results(eval_dir(run) / name, point), out, images, fields[0.0], cfg)
    return 0


def lung_fields_of(data, test: list, size: int) -> tuple:
    """({grow: (N, size, size) bool} for the fields shrunk, as drawn and grown by 3 % of the crop, what
    they are): the lung masks where the folder has them, else lungcrop's approximate ellipses."""
    masks = [data.folder / "masks" / Path(r["image"]).name for r in test]
    masks = [np.asarray(Image.open(m)) > 127 if m.exists() else None for m in masks]
    regions = [[float(v) for v in r["lungs"].split()] for r in test]
    fields = {g: np.stack([lung_fields(x, size, g, m) for x, m in zip(regions, masks)]) for g in (-0.03, 0.0, 0.03)}
    what = "the lung masks" if all(m is not None for m in masks) else \
        "approximate: two ellipses where the lungs lie on average (lungcrop.LUNG_FIELDS)"
    return fields, what


def arms(model, cfg: dict, data, test: list, images: np.ndarray, fields: np.ndarray) -> tuple:
    """({arm: P(disease) per film}: as trained, with the reference framing (where the run's differs) and
    with the lung fields hidden, all by this model in this dtype, so that no offset between two
    pipelines enters a difference; the mean crop: what hides a place, the same for every film)."""
    mean = images.mean(0).round().astype(np.uint8)  # (1, H, W)
    scores = {"as trained": C.predict(model, images, cfg, batch=16, progress=True)[:, 1]}
    if any(r["reference"] != r["image"] for r in test):
        scores["reference framing"] = C.predict(model, data.images(test, "reference"), cfg)[:, 1]
    scores["lung fields hidden"] = C.predict(model, np.where(fields[:, None], mean, images), cfg)[:, 1]
    return scores, mean


def arm_figures(s, y, draws: list, cfg: dict, point: dict, arm: str) -> dict:
    cut = point["thresholds"][cfg["classes"][1]]
    out = dict(auc=M.roc_auc(y, s), auc_ci95=M.interval([M.roc_auc(y[i], s[i]) for i in draws]),
               mean_p={c: float(s[y == k].mean()) for k, c in enumerate(cfg["classes"])},
               positive={c: float(calls(np.stack([1 - s, s], 1), cfg, point)[y == k, 1].mean())
                         for k, c in enumerate(cfg["classes"])})
    print(f"{arm}: AUC {pct(out['auc'])} [{pct(out['auc_ci95'][0])}, {pct(out['auc_ci95'][1])}]; mean "
          f"P({cfg['classes'][1]}) " + ", ".join(f"{c} {v:.3f}" for c, v in out["mean_p"].items())
          + f"; called positive at {cut:.3f}: " + ", ".join(f"{c} {pct(v)} %" for c, v in out["positive"].items()))
    return out


def write(folder: Path, out: dict, images: np.ndarray, fields: np.ndarray, cfg: dict):
    write_atomic(folder / "probe.json", json.dumps(out, indent=1))
    grid = out["occlusion"]
    plots.draw_probe(folder / "probe.png", images.mean(0)[0], np.array(grid["drop"]), np.array(grid["significant"]),
                     fields.mean(0) >= 0.5, f"P({cfg['classes'][1]}): AUC drop when each cell is hidden (red; "
                     f"darkest {pct(max(0, np.max(grid['drop'])))} points), lung fields "
                     f"({out['lung_fields']['what'].split(':')[0]}) in green")
    print(f"wrote probe.json, probe.png in {folder}")


def occlusion(model, images: np.ndarray, mean, s0, cfg: dict, y, draws: list, fields: dict, grid=8) -> dict:
    """Each of grid x grid cells of the crop in turn replaced by `mean` (the films' mean) on every image: the
    AUC drop (as trained, `s0`, minus with the cell hidden) with its paired patient interval; which cells
    lower it beyond chance, tested together (each cell's p-value: the share of patient resamples where its
    drop is not above 0; Holm's test at 5 % family-wise, so that 64 cells do not bring 64 chances of a
    false alarm); each cell's share outside the lung fields for each growth of `fields` ({grow: (N, H, W)
    bool}); the share of the total positive drop that comes from outside them."""
    size = images.shape[-1]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    weights = np.stack([np.bincount(i, minlength=len(y)) for i in draws])  # (B, N): each resample's draws
    auc0, base = M.roc_auc(y, s0), M.roc_auc_weighted(y, s0, weights)
    drop, boot = np.zeros((grid, grid)), np.zeros((len(draws), grid, grid))
    outside = {g: np.zeros((grid, grid)) for g in fields}
    for r in range(grid):
        for c in range(grid):
            rs, cs = slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])
            hidden = images.copy()
            hidden[..., rs, cs] = mean[..., rs, cs]
            s = C.predict(model, hidden, cfg)[:, 1]
            drop[r, c] = auc0 - M.roc_auc(y, s)
            boot[:, r, c] = base - M.roc_auc_weighted(y, s, weights)
            for g, f in fields.items():
                outside[g][r, c] = 1 - f[:, rs, cs].mean()
    ci = np.percentile(boot, [2.5, 97.5], axis=0).transpose(1, 2, 0)
    p = ((boot <= 0).sum(0) + 1) / (len(draws) + 1)  # (grid, grid): one-sided bootstrap p-values
    positive = np.clip(drop, 0, None)
    share = {g: float((positive * o).sum() / positive.sum()) if positive.sum() else None for g, o in outside.items()}
    return dict(grid=grid, cell_px=int(edges[1]), auc=auc0, drop=drop.tolist(), drop_ci95=ci.tolist(),
                p=p.tolist(), significant=M.holm(p.ravel()).reshape(grid, grid).tolist(),
                outside={str(g): o.tolist() for g, o in outside.items()},
                outside_share_of_drop={str(g): v for g, v in share.items()})


def probe_verdict(out: dict, y, scores: dict, draws: list) -> list:
    """The alarm: a cell whose hiding lowers the AUC beyond chance (its interval above 0) and lies mostly
    outside the lung fields; it must hold with the fields grown and shrunk by 3 % of the crop, else the
    verdict is "inconclusive". Where no single cell matters, the lung fields hidden whole must leave
    chance (an interval holding 0.5), else the signal outside them is spread over many cells. Then the
    framing (the paired interval of as trained minus the reference framing)."""
    occ, lf = out["occlusion"], out["lung_fields"]
    significant = np.array(occ["significant"])
    culprits = {g: [(r, c) for r, c in zip(*np.nonzero(significant)) if o[r][c] >= 0.5]
                for g, o in occ["outside"].items()}
    alarms = {g: bool(v) for g, v in culprits.items()}
    share = occ["outside_share_of_drop"]["0.0"]
    fields = f"lung fields ({lf['what']}; {pct(lf['share_of_crop'])} % of the crop)"
    said = (f"hiding each of {occ['grid']}x{occ['grid']} cells of {occ['cell_px']} px in turn: "
            f"{int(significant.sum())} lower the AUC ({pct(occ['auc'])}) beyond chance" + ("" if share is None else
            f"; {pct(share)} % of the total drop comes from outside the {fields}"))
    hidden = out["lung fields hidden"]
    lo, hi = hidden["auc_ci95"]
    whole = f"with the lung fields hidden whole the AUC is {pct(hidden['auc'])} [{pct(lo)}, {pct(hi)}]"
    if all(alarms.values()):
        where = ", ".join(f"row {r + 1} col {c + 1}" for r, c in culprits["0.0"])
        lines = [f"{said}: the model reads something outside the lungs (markers, text, devices, the body's edge): "
                 f"cells {where} (probe.png)"]
    elif any(alarms.values()):
        lines = [f"{said}: inconclusive: whether a cell that matters lies outside the lungs depends on how "
                 "large the lung fields are drawn (grown or shrunk by 3 % of the crop); see probe.png"]
    elif lo > 0.5 or hi < 0.5:  # no single cell, yet the fields hidden whole leave the classes apart
        lines = [f"{said}; but {whole}: the model reads something outside the lung fields spread over many cells "
                 "(the body's outline, the view, the exposure, or lung near the fields' edges: they are drawn "
                 "smaller than the lungs)"]
    else:
        lines = [f"{said}: no cell outside the lung fields lowers it beyond chance: no sign that the model reads "
                 "anything outside the lungs"]
    lines.append(whole + (": the model still separates the classes without them" if lo > 0.5 or hi < 0.5 else
                          ", which holds chance"))
    if "reference framing" in scores:
        diff = M.interval([M.roc_auc(y[i], scores["as trained"][i]) - M.roc_auc(y[i], scores["reference framing"][i])
                         for i in draws])
        moved = diff[0] > 0 or diff[1] < 0
        lines.append(f"as trained minus reference framing, AUC: [{pct(diff[0])}, {pct(diff[1])}]: "
                     + ("the framing changes what the model says" if moved else "no sign that the framing matters"))
    else:
        lines.append("the run's framing is the reference framing (the thorax box, the same for every film)")
    return lines


def parser():
    ap = C.scoring_flags(__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="another prepared folder to probe (every film the run never saw)")
    ap.add_argument("--classes", help="with --data: map its label names to the run's, e.g. 'healthy=normal'")
    return ap


def main(argv=None):
    opt = C.scoring_options(parser(), argv)
    if opt.classes and not opt.data:
        raise UserError("--classes maps the label names of --data; give --data DIR")
    return probe(Path(opt.runs), opt)


if __name__ == "__main__":
    sys.exit(cli(main, (P.CheckpointError,)))
