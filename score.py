"""
New films scored by a run's model at its operating point: DICOM, PNG, JPEG or TIFF files, or folders
of them, read, windowed, framed and resized exactly as prepare.py did the run's films (radiographs.py):

    python score.py --runs out/demo --fold 1 --image new_patient.dcm more/   # P(disease), the call
    python score.py --runs out/demo --fold 1 --image x.dcm --explain        # and its Grad-CAM map

A line per image for a handful, a count for more; one CSV row per image, named by its place in the
listing (image<N>), never by its file name (it can name a patient): the run's eval/image_scores.csv,
or image_scores-2.csv, .. beside earlier results (--csv elsewhere). Films of the run's own data
folder are named as such: their scores are not those of new films.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common as C
import explain
import plots
import pneumollm as P
import radiographs as R
from folders import UserError, cli
from runs import called, decision, describe, eval_dir, fresh, operating_point, run_data, writable, write_predictions
from sites import own_films


def score_images(runs: Path, opt) -> int:
    run = runs / f"fold{opt.fold}"
    C.check_finished(run, opt.fold)
    cfg = C.read_config(run)
    point = operating_point(run, cfg, opt.sensitivity)
    writable(run if not (opt.csv and (not opt.explain or opt.explain_dir)) else None)
    if cfg.get("synthetic"):
        print("NOTE: this model was trained on the synthetic demo set: it is a demo, not for diagnosis")
    if cfg.get("masks"):
        print("NOTE: the run's images were cropped to lung masks; new images are framed by the thorax box")
    # the data may have moved away; if it is there, it must match
    ours = run_data(cfg) if (Path(cfg["data"]) / "meta.json").exists() else None
    model, cfg = C.load_run(run, opt.device, True, opt.cpu_dtype)
    failed, scored = [], []  # scored: (place in the listing, file, crop, how it was cropped)
    for n, p in enumerate(R.list_images(opt.image), 1):
        if not p.is_file():
            failed.append(f"{p}: no such file")
            continue
        try:  # exactly prepare.py's pipeline: read, window, 8 bits, crop, resize
            img, _, how, _ = R.preprocess(p, cfg["crop"], cfg["size"])
        except R.Skip as e:
            failed.append(f"{p}: {e}")
            continue
        scored.append((n, p, img, how))
    if scored:
        images = np.stack([s[2] for s in scored])[:, None]
        if ours:  # a film of the run's own data is not a new film
            own_films(ours, "--image", images)
        probs = C.predict(model, images, cfg, batch=16, progress=True)
        eval_dir(run).mkdir(exist_ok=True)
        table = Path(opt.csv) if opt.csv else fresh(eval_dir(run) / "image_scores.csv")
        maps = Path(opt.explain_dir) if opt.explain_dir else fresh(eval_dir(run) / "explain")
        report_images(model, scored, probs, cfg, point, opt, table, maps)
    for line in failed:
        print(f"skipped {line}", file=sys.stderr)
    return 2 if not scored else 0  # nothing scored: a mistake in the input


def report_images(model, scored: list, probs: np.ndarray, cfg: dict, point: dict, opt, table: Path, maps: Path):
    """A line per image for a handful (and their crops and maps when asked), a count for more; the CSV
    names images by their place in the listing (image<N>), never by file name: it can name a patient."""
    weights = []
    for (n, p, img, how), prob in zip(scored, probs) if len(scored) <= 10 else ():
        if opt.save_crops:
            Path(opt.save_crops).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(Path(opt.save_crops) / f"crop{n}.png")
        print(f"{p}: " + describe(prob, cfg, point) + f"; crop: {how}"
              + (f"; crop saved as crop{n}.png" if opt.save_crops else ""))
        if opt.explain:
            weights.append(explain_image(model, img, cfg, maps / f"image{n}.explain.png",
                                         called(prob, cfg, point)))
    if len(scored) > 10:
        calls = [decision(prob, cfg, point) for prob in probs]
        print(f"{len(scored)} images scored: " + ", ".join(f"{c} {calls.count(c)}" for c in sorted(set(calls)))
              + " at the run's operating point")
    write_predictions(table, [f"image{n}" for n, *_ in scored], probs, cfg, point)
    print(f"wrote {table} (image<N>: the N-th file given, folders listed in sorted order)")
    if weights and weights[0] is not None:
        print(explain.describe_weights(torch.cat(weights), model.visual.cls_blocks))


def explain_image(model, img: np.ndarray, cfg: dict, path: Path, target=None):
    """<name>.explain.png: the crop the model saw under the Grad-CAM map of class `target` (default:
    the argmax); returns the engine's weights."""
    target = None if target is None else [target]
    heats, explained, weights = explain.explain_images(model, torch.tensor(img)[None, None], cfg, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    plots.overlay(img, heats[0], f"map of {cfg['classes'][int(explained[0])]}").save(path)
    print(f"  explanation: {path}")
    return weights

def parser():
    ap = C.scoring_flags(__doc__.split("\n\n")[0])
    ap.add_argument("--image", nargs="+", required=True, help="DICOM/PNG/JPEG/TIFF files or folders to score")
    ap.add_argument("--csv", help="where to write one row per image (default: the run's eval/image_scores.csv, or "
                    "image_scores-2.csv, .. where earlier results are)")
    ap.add_argument("--save-crops", metavar="DIR", help="write the crop the model saw")
    ap.add_argument("--explain", action="store_true", help="a Grad-CAM map per image (explain.py), for 10 or fewer")
    ap.add_argument("--explain-dir", help="where --explain writes (default: the run's eval/explain/, or explain-2/, "
                    ".. where earlier maps are)")
    return ap


def main(argv=None):
    opt = C.scoring_options(parser(), argv)
    if opt.explain_dir and not opt.explain:
        raise UserError("--explain-dir says where --explain writes its maps; add --explain")
    return score_images(Path(opt.runs), opt)


if __name__ == "__main__":
    sys.exit(cli(main, (P.CheckpointError,)))
