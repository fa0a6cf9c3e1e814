"""``taft-predict``: classify images with an exported model (``taft-ledger export``).

    taft-predict EXPORT_DIR DATA [--out preds.csv] [--batch-size N]
                 [--fingerprint SHA256:HEX | --public-key PEM | --no-verify]

EXPORT_DIR holds ``manifest.json`` and the model file; which model it is comes from the manifest:

- a TAFT Δ export (``composed_delta.safetensors``): w0 is rebuilt from the manifest's model spec
  (the pretrained backbone, tangent.protocol.spec.build_model) and the composed Δ loaded into it; scores are
  the softmax probabilities of the logits;
- an exact-head export (``exact_head.safetensors``): the frozen features are rebuilt with
  ``FeatureExtractor.from_spec`` from the model card and the ridge head applied (φ clipped and put
  on the statistics' grid, as in training); scores are the ridge outputs.

Before anything is loaded the export is verified (tangent/serving/export_check.py): the signed
head, and the signed statement over the whole manifest and the model file's bytes; the bytes that
are served are the ones checked. ``--fingerprint`` (the ``SHA256:…`` the operator publishes) or
``--public-key`` pins the signer (authenticity); without either, the key the export carries is
used, which proves only that the export is intact. ``--no-verify`` skips the check, with a warning.
Either way the rebuilt base (the w0 digest, or the feature digest) must equal the manifest's: a
different backbone, spec or feature generator is refused rather than silently giving other
predictions.

DATA is an ``.npz`` with ``images`` (uint8 [N,H,W] or [N,H,W,3]) and optional ``labels``, or an
image directory: ImageFolder (one sub-directory per class, sorted names = class ids: labels known)
or a flat directory of images (no labels). Writes one CSV row per image (``index,predicted,score``)
and prints the accuracy when labels are known.
Exit status: 0 success, 2 a wrong export directory, data or mismatching model.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tangent.serving import export_check

MANIFEST_FILE = export_check.MANIFEST_FILE


class PredictError(ValueError):
    """The export or the data cannot be used; the message says why."""


# ------------------------------------------------------------------------------ data

def load_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8, labels or None) from an .npz, an ImageFolder or a flat image directory."""
    from tangent.data.sets import IMAGE_SUFFIXES, DataError, load_site_data, validate_images

    path = Path(path)
    if not path.exists():
        raise PredictError(f"data {path} does not exist")
    try:
        if path.is_dir():
            if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
                return load_site_data(path)
            return _flat_directory(path, IMAGE_SUFFIXES), None
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise PredictError(f"{path} must hold an array 'images' (and optionally 'labels'), has {list(archive)}")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive else None
    except (DataError, PredictError):
        raise
    except Exception as err:  # zip/format errors: not an npz
        raise PredictError(f"cannot read {path} as .npz or image directory: {err}") from err
    if labels is None:
        images, _ = validate_images(images, np.zeros(len(images), np.int64), source=str(path))
        return images, None
    return validate_images(images, labels, source=str(path))


def _flat_directory(root: Path, suffixes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise PredictError(f"{root} holds no images ({', '.join(suffixes)}) and no class sub-directories")
    images, size = [], None
    for file in files:
        try:
            with Image.open(file) as opened:
                image = np.asarray(opened.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise PredictError(f"{file}: not a readable image ({err})") from err
        size = size or image.shape
        if image.shape != size:
            image = np.asarray(Image.fromarray(image).resize(size[1::-1]))
        images.append(image)
    return np.stack(images)


# ------------------------------------------------------------------------------ models

def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise PredictError(f"{directory} is not a directory (expected a `taft-ledger export` output)")
    try:
        return export_check.read_manifest(directory)
    except export_check.ExportError as err:
        raise PredictError(str(err)) from None


def _model_file(directory: Path, manifest: dict, key: str, verified: dict[str, bytes] | None) -> dict[str, np.ndarray]:
    """The arrays of the file the manifest names under ``key``: from ``verified`` (the bytes whose
    signed digest was checked) when given, else read from the directory."""
    import safetensors.numpy

    name = manifest.get(key)
    if not isinstance(name, str) or Path(name).name != name:
        raise PredictError(f"the manifest's {key} {name!r} is not a file name in the export")
    try:
        if verified is not None:
            return safetensors.numpy.load(verified[name])
        return safetensors.numpy.load_file(directory / name)
    except (FileNotFoundError, KeyError):
        raise PredictError(f"the export lacks {name}") from None
    except Exception as err:
        raise PredictError(f"{directory / name} is not a readable safetensors file: {err}") from err


class ExactHeadModel:
    """Frozen features + ridge head (tangent.exact_head.statistics.RidgeHead.scores)."""

    kind = "exact-head"

    def __init__(self, directory: Path, manifest: dict, verified: dict[str, bytes] | None = None):
        from tangent.exact_head.features import FeatureExtractor, FeatureSpec
        from tangent.protocol.spec import ModelSpec

        card = manifest.get("model_card")
        try:
            model_spec = ModelSpec.from_config(card["model-spec"])
            feature_spec = FeatureSpec.from_config(card["feature-spec"])
            meta = card["stats-meta"]
            self.clip_norm, self.frac_bits = float(meta["clip-norm"]), int(meta["frac-bits"])
            expected = card["feature-digest"]
        except (KeyError, TypeError, ValueError) as err:
            raise PredictError(f"the manifest's model card is incomplete or invalid: {err}") from err
        head = _model_file(directory, manifest, "head_file", verified)
        if set(head) != {"weight", "bias"}:
            raise PredictError(f"the head file must hold 'weight' and 'bias', holds {sorted(head)}")
        self.extractor = FeatureExtractor.from_spec(model_spec, feature_spec)
        digest = self.extractor.digest()
        if digest != expected:
            raise PredictError(f"the rebuilt feature extractor's digest {digest} differs from the export's "
                               f"{expected}: other backbone weights, feature spec or random-feature generator")
        self.weight, self.bias = head["weight"].astype(np.float64), head["bias"].astype(np.float64)
        if self.weight.shape != (self.extractor.dim, len(self.bias)):
            raise PredictError(f"head weight {self.weight.shape} does not fit {self.extractor.dim} features "
                               f"and {len(self.bias)} classes")
        self.img_size = model_spec.img_size
        self.num_classes = len(self.bias)

    def scores(self, batch) -> np.ndarray:
        from tangent.exact_head.statistics import dequantize, quantize

        phi = self.extractor.compute(batch, batch_size=len(batch), tokens=False)
        x = dequantize(quantize(phi, self.clip_norm, self.frac_bits), self.clip_norm, self.frac_bits)
        return x @ self.weight + self.bias


class DeltaModel:
    """w0 (rebuilt from the model spec) + the composed Δ: a TangentViT."""

    kind = "taft-delta"

    def __init__(self, directory: Path, manifest: dict, verified: dict[str, bytes] | None = None):
        import torch

        from tangent.protocol.spec import ModelSpec, build_model

        if not isinstance(manifest.get("model_spec"), dict):
            raise PredictError("this Δ export names no model spec to rebuild w0 from; export it again with "
                               "`taft-ledger export --model-spec '{...}'` (the run's ModelSpec config)")
        from tangent.protocol.spec import BACKBONE_FILE_KEYS, KEYS

        # every key from the export, none from a default here: a default (reinit once was one)
        # that differs from the run's rebuilds another w0 (a brought backbone's keys are in the
        # spec only when the run set them)
        missing = sorted({key for field, key in KEYS.items() if field not in BACKBONE_FILE_KEYS}
                         - set(manifest["model_spec"]))
        if missing:
            raise PredictError(f"the manifest's model spec lacks {', '.join(missing)}: export it again from a "
                               "ledger that recorded the run's spec (or with the run's full --model-spec)")
        try:
            spec = ModelSpec.from_config(manifest["model_spec"])
        except (TypeError, ValueError) as err:
            raise PredictError(f"the manifest's model spec is invalid: {err}") from err
        composed = _model_file(directory, manifest, "composed_file", verified)
        model, digest = build_model(spec, cached=False)
        if digest != manifest.get("base_digest"):
            raise PredictError(f"the rebuilt w0's digest {digest} differs from the export's base digest "
                               f"{manifest.get('base_digest')}: other backbone weights or model spec")
        try:
            model.load_delta({k: torch.from_numpy(v) for k, v in composed.items()})
        except (KeyError, ValueError) as err:
            raise PredictError(f"the composed Δ does not fit the rebuilt model: {err}") from err
        self.model = model.eval()
        self.img_size = spec.img_size
        self.num_classes = spec.num_classes

    def scores(self, batch) -> np.ndarray:
        import torch

        with torch.no_grad():
            return torch.softmax(self.model(batch).float(), dim=1).numpy().astype(np.float64)


def load_model(directory: str | Path, verified: export_check.VerifiedExport | None = None):
    """The model an export holds (see the module docstring): the verified manifest and bytes when
    ``verified`` is given, else the directory's files unchecked."""
    directory = Path(directory)
    manifest = read_manifest(directory) if verified is None else verified.manifest
    files = None if verified is None else verified.files
    family = manifest.get("family", "delta")  # exports from before families hold a Δ
    if family == "stats":
        return ExactHeadModel(directory, manifest, files)
    if family == "delta":
        return DeltaModel(directory, manifest, files)
    raise PredictError(f"unknown model family {family!r} in {directory / MANIFEST_FILE}")


def predict(model, images: np.ndarray, batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class [N], its score [N]) for uint8 images."""
    from tqdm.auto import tqdm

    from tangent.data.sets import preprocess

    predicted = np.empty(len(images), np.int64)
    score = np.empty(len(images), np.float64)
    with tqdm(total=len(images), desc=f"predict ({model.kind})", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            stop = min(len(images), start + batch_size)
            s = model.scores(preprocess(images[start:stop], model.img_size))
            predicted[start:stop] = s.argmax(axis=1)
            score[start:stop] = s.max(axis=1)
            bar.update(stop - start)
    return predicted, score


def write_csv(path: Path, predicted: np.ndarray, score: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "predicted", "score"])
        for i, (p, s) in enumerate(zip(predicted.tolist(), score.tolist())):
            w.writerow([i, p, f"{s:.9g}"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taft-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, metavar="EXPORT_DIR", help="a `taft-ledger export` directory")
    parser.add_argument("data", type=Path, metavar="DATA", help=".npz (images[, labels]) or image directory")
    parser.add_argument("--out", type=Path, default=Path("preds.csv"), help="CSV to write (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    pin = parser.add_argument_group("verification (before anything is served)")
    pin.add_argument("--fingerprint", metavar="SHA256:HEX", default=None,
                     help="the server's key fingerprint as the operator publishes it (pins the signer)")
    pin.add_argument("--public-key", type=Path, metavar="PEM", default=None,
                     help="the server's public key obtained from the operator (pins the signer)")
    pin.add_argument("--no-verify", action="store_true", help="serve without checking the signatures (warns)")
    return parser


def verify(args) -> export_check.VerifiedExport | None:
    """The verified export, or None with a warning under ``--no-verify``; PredictError when it fails."""
    if args.no_verify:
        print("taft-predict: WARNING: --no-verify: the export's signatures are not checked; its predictions, "
              "privacy claims and site list may have been changed by anyone who could write it", file=sys.stderr)
        return None
    if not args.export.is_dir():
        raise PredictError(f"{args.export} is not a directory (expected a `taft-ledger export` output)")
    try:
        verified = export_check.verify_export(args.export, public_key=args.public_key, fingerprint=args.fingerprint)
    except export_check.ExportRefused as err:
        raise PredictError("the export fails verification, nothing served:\n  " + "\n  ".join(err.problems)) from None
    except (export_check.ExportError, ValueError) as err:
        raise PredictError(str(err)) from None
    if not verified.pinned:
        print(f"note: verified against the key the export carries ({verified.fingerprint}): the export is intact; "
              f"pin the signer with --fingerprint to know who signed it", file=sys.stderr)
    return verified


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("taft-predict: --batch-size must be >= 1", file=sys.stderr)
        return 2
    from tangent.data.sets import DataError

    try:
        if args.no_verify and (args.fingerprint or args.public_key):
            raise PredictError("--no-verify contradicts --fingerprint/--public-key")
        model = load_model(args.export, verify(args))
        images, labels = load_images(args.data)
        predicted, score = predict(model, images, args.batch_size, progress=not args.no_progress)
        write_csv(args.out, predicted, score)
    except (PredictError, DataError) as err:
        print(f"taft-predict: {err}", file=sys.stderr)
        return 2
    print(f"{model.kind}: {len(images)} image(s) -> {args.out}")
    if labels is not None:
        if labels.max(initial=0) >= model.num_classes:
            print(f"note: labels go up to {labels.max()}, the model has {model.num_classes} classes")
        print(f"accuracy {float((predicted == labels).mean()):.4f} ({int((predicted == labels).sum())}/{len(labels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
