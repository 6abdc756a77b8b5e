"""A candidate's temperature: fitted on predictions that are out-of-sample for its final model,
checked on holdout rows the fit never saw, and kept in its ``model.json`` (where scoring and
evaluation read it), with a reliability diagram beside it.

Which predictions are out-of-sample depends on the final model:
- ``best_fold``: the chosen fold's validation predictions (that model never trained on them);
  the check is the whole holdout.
- ``ensemble`` and ``refit``: every training image helped train the final model, so only the
  holdout is out-of-sample: half of it (by row parity) fits, the other half checks.
"""

from __future__ import annotations

import logging

import numpy as np

from darkroom import layout
from darkroom.model.calibration import (
    apply_temperature,
    calibrate,
    reliability,
    reliability_png,
)
from darkroom.storage import Storage

log = logging.getLogger(__name__)


def calibrate_candidate(
    storage: Storage, version: str, holdout_probs: np.ndarray, holdout_labels: np.ndarray
) -> dict:
    """Fits and checks the candidate's temperature (``holdout_probs``: its uncalibrated
    probabilities on the holdout rows), writes it into model.json and reliability.png.
    Returns model.json's calibration block: ``Calibration.as_dict()`` and ``fitted_on``."""
    meta = storage.read_json(layout.version(version, "model.json"))
    fit_p, fit_y, check_p, check_y, fitted_on = _split(
        storage, meta, version, holdout_probs, holdout_labels
    )
    calibration = calibrate(_log(fit_p), fit_y, _log(check_p), check_y)
    meta["calibration"] = {**calibration.as_dict(), "fitted_on": fitted_on}
    storage.write_json(layout.version(version, "model.json"), meta)
    after = apply_temperature(_log(check_p), calibration.fitted_temperature)
    title = f"{version}: the holdout rows that checked the temperature"
    png = reliability_png(reliability(check_p, check_y), reliability(after, check_y), title)
    storage.write_bytes(layout.version(version, "reliability.png"), png)
    log.info(
        "%s: temperature %.3f (%s; fitted on %s)",
        version,
        calibration.temperature,
        calibration.reason,
        fitted_on,
    )
    return meta["calibration"]


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, 1e-12, None))


def _split(storage: Storage, meta: dict, version: str, probs: np.ndarray, labels: np.ndarray):
    """(fit probs, fit labels, check probs, check labels, what the fit used)."""
    if meta.get("final_model", "best_fold") == "best_fold":
        fold = meta["chosen_fold"]
        oof = storage.read_parquet(layout.version(version, "oof.parquet"))
        own = oof[oof["fold"] == fold]
        where = f"fold {fold}'s validation predictions (out-of-sample for its model)"
        return (
            np.stack(own["probs"].to_numpy()),
            own["class_index"].to_numpy(),
            probs,
            labels,
            where,
        )
    even = np.arange(len(labels)) % 2 == 0
    where = (
        f"half of the holdout ({int(even.sum())} rows): a {meta['final_model']} model has no "
        "out-of-sample training predictions; the other half checks it"
    )
    return probs[even], labels[even], probs[~even], labels[~even], where
