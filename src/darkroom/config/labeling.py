"""The labeling queue's parameters: how many images to ask people about, and how to pick them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from darkroom.config.runtime import StorageConfig

# The label-queue flow's whole-run limit (it reads predictions and writes three small files).
LABEL_QUEUE_TIMEOUT_SECONDS = 30 * 60
# The longest a presigned S3 link may live (SigV4): seven days.
MAX_URL_EXPIRY_SECONDS = 7 * 24 * 3600


class LabelQueueConfig(StorageConfig):
    """``darkroom label-queue`` and the label-queue deployment: which of the champion's scored
    incoming images are worth a person's labels."""

    n: int = Field(200, ge=1, description="Images to queue (fewer when fewer are waiting).")
    strategy: Literal["margin", "entropy", "least_confident"] = Field(
        "margin",
        description="How uncertainty is measured on the calibrated probabilities: margin (1 - "
        "the gap between the two likeliest classes), entropy, or least_confident (1 - the top "
        "probability).",
    )
    random_share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of the queue drawn at random: their labels measure the champion "
        "without the queue's bias and catch the mistakes it is sure of.",
    )
    candidate_factor: int = Field(
        2,
        ge=1,
        description="The most uncertain (distinct) images considered per pick; greedy "
        "k-center on their embeddings picks among them. 1: the most uncertain alone; more "
        "spreads the queue wider at the cost of fewer mistakes in it (on the demo's clean and "
        "rotated digits, 100 picks: 89% wrong at 1, 73% at 2, 31% at 5; 46% of all are wrong).",
    )
    url_expiry_seconds: int = Field(
        MAX_URL_EXPIRY_SECONDS,
        ge=60,
        le=MAX_URL_EXPIRY_SECONDS,
        description="How long the image links of an S3 root stay valid (presigned URLs; a link "
        "signed with temporary credentials dies with them). A queued image is not queued again "
        "for this long unless it is labeled.",
    )
    seed: int = Field(0, description="Seed of the random share and of the distance sample.")
