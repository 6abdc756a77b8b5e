"""What a version keeps to be watched by (its reference), and when a scored batch counts as
drifted from it. Every threshold of the drift report is a field here (the UI form's
descriptions come from them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReferenceConfig(BaseModel):
    """The reference a retrain keeps with each version (``models/<version>/reference.npz``)."""

    model_config = ConfigDict(extra="forbid")

    dims: int = Field(
        128,
        ge=2,
        le=512,
        description="PCA components the penultimate-layer embeddings keep (each embedding "
        "scaled to unit length first).",
    )
    k: int = Field(
        1,
        ge=1,
        description="An image's distance to the reference is to its k-th nearest image "
        "(1: nearest-neighbour out-of-distribution detection, as in Sun et al. 2022).",
    )
    percentile: float = Field(
        99.0,
        gt=50,
        le=100,
        description="An image farther from the reference than this percentile of the holdout's "
        "own distances is unfamiliar.",
    )
    max_samples: int = Field(
        2000,
        ge=50,
        description="Training images (and holdout images) embedded for the reference: it "
        "stays a few hundred KB whatever the dataset.",
    )


class DriftConfig(BaseModel):
    """When a scoring run counts as drifted from the champion's reference."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="Embed each scored image (same forward pass), flag unfamiliar ones and "
        "write a drift report per run (off: the rows' unfamiliar column stays empty).",
    )
    min_images: int = Field(
        50,
        ge=2,
        description="A run that scored fewer images says 'too few to tell' instead of a verdict.",
    )
    unfamiliar_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Drift when more than this share of the images is unfamiliar (farther "
        "from the reference than the holdout's images are).",
    )
    alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Significance level of the class-mix (chi-square), confidence (KS) and "
        "embedding (MMD permutation) tests.",
    )
    js_distance: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Drift when the predicted class mix is this far (Jensen-Shannon distance) "
        "from the reference's, and the chi-square test agrees.",
    )
    ks_statistic: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Drift when the calibrated confidences differ from the reference's by this "
        "KS statistic, and the KS test agrees.",
    )
    permutations: int = Field(
        200, ge=20, description="Permutations of the MMD test on the embeddings."
    )
    max_mmd_samples: int = Field(
        500,
        ge=20,
        description="Images per side the MMD test sees (its cost grows with their square).",
    )
