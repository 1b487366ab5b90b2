"""Deep-metric-learning base losses: pure functions plus thin Keras wrappers.

Use :func:`get` to build a loss layer by name (the train CLI and ``DRegModel``
do), or instantiate the classes directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from detreg_keras.losses.base import DMLLoss
from detreg_keras.losses.circle import CircleLoss, circle_loss
from detreg_keras.losses.contrastive import ContrastiveLoss, contrastive_loss
from detreg_keras.losses.direction import DirectionRegularizedTripletLoss, direction_regularized_triplet_loss
from detreg_keras.losses.language_guidance import LanguageGuidedLoss, language_guidance_loss
from detreg_keras.losses.lifted import LiftedStructureLoss, lifted_structure_loss
from detreg_keras.losses.margin import MarginLoss, margin_loss
from detreg_keras.losses.margin_softmax import (
    ArcFaceLoss,
    CosFaceLoss,
    NormalizedSoftmaxLoss,
    arcface_loss,
    cosface_loss,
    normalized_softmax_loss,
)
from detreg_keras.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from detreg_keras.losses.npair import NPairLoss, npair_loss
from detreg_keras.losses.proxy_anchor import ProxyAnchorLoss, proxy_anchor_loss
from detreg_keras.losses.proxy_gml import ProxyGMLLoss, proxy_gml_loss
from detreg_keras.losses.proxy_nca import ProxyNCALoss, ProxyNCAPlusPlusLoss, proxy_nca_loss, proxy_nca_pp_loss
from detreg_keras.losses.recall_at_k import RecallAtKLoss, recall_at_k_loss
from detreg_keras.losses.rho import RhoTripletLoss, rho_spectrum, rho_triplet_loss
from detreg_keras.losses.soft_triple import SoftTripleLoss, soft_triple_loss
from detreg_keras.losses.triplet import TripletMarginLoss, triplet_margin_loss
from detreg_keras.losses.xbm import CrossBatchMemory, cross_batch_loss  # cross-batch memory (XBM)

#: name -> loss layer class. Every entry accepts ``num_classes`` and ``embedding_dim``.
LOSSES: dict[str, Callable[..., DMLLoss]] = {
    "proxy_anchor": ProxyAnchorLoss,
    # pair-based
    "contrastive": ContrastiveLoss,
    "triplet": TripletMarginLoss,
    "rho_triplet": RhoTripletLoss,
    "triplet_dr": DirectionRegularizedTripletLoss,
    "margin": MarginLoss,
    "npair": NPairLoss,
    "lifted_structure": LiftedStructureLoss,
    "multi_similarity": MultiSimilarityLoss,
    "circle": CircleLoss,
    "recall_at_k": RecallAtKLoss,
    # proxy-based
    "proxy_nca": ProxyNCALoss,
    "proxy_nca_pp": ProxyNCAPlusPlusLoss,
    "soft_triple": SoftTripleLoss,
    "proxy_gml": ProxyGMLLoss,
    "normalized_softmax": NormalizedSoftmaxLoss,
    "cosface": CosFaceLoss,
    "arcface": ArcFaceLoss,
    # wrapper: a pair loss over the batch and a queue of past embeddings
    "xbm": CrossBatchMemory,
    "language_guidance": LanguageGuidedLoss,
}


def register(name: str, cls: Callable[..., DMLLoss]) -> None:
    """Register a loss class under ``name`` so :func:`get` and the CLI can build it."""
    LOSSES[name] = cls


def get(loss_name: str, num_classes: int | None = None, embedding_dim: int | None = None, **kwargs: Any) -> DMLLoss:
    """Build the loss layer registered as ``name``.

    Args:
        loss_name: registry key, e.g. ``"proxy_anchor"`` (see :data:`LOSSES`).
        num_classes: number of training classes (for proxy-based losses).
        embedding_dim: embedding dimension (for proxy-based losses).
        **kwargs: the loss's own hyper-parameters (and Keras layer arguments such as ``name``).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    key = loss_name.lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"Unknown loss {loss_name!r}. Known losses: {sorted(LOSSES)}.")
    return LOSSES[key](num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)


__all__ = [
    "LOSSES",
    "LanguageGuidedLoss",
    "language_guidance_loss",
    "ArcFaceLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "CrossBatchMemory",
    "DMLLoss",
    "DirectionRegularizedTripletLoss",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NPairLoss",
    "NormalizedSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyGMLLoss",
    "ProxyNCALoss",
    "ProxyNCAPlusPlusLoss",
    "RecallAtKLoss",
    "RhoTripletLoss",
    "SoftTripleLoss",
    "TripletMarginLoss",
    "arcface_loss",
    "circle_loss",
    "contrastive_loss",
    "cosface_loss",
    "cross_batch_loss",
    "direction_regularized_triplet_loss",
    "get",
    "lifted_structure_loss",
    "margin_loss",
    "multi_similarity_loss",
    "normalized_softmax_loss",
    "npair_loss",
    "proxy_anchor_loss",
    "proxy_gml_loss",
    "proxy_nca_loss",
    "proxy_nca_pp_loss",
    "recall_at_k_loss",
    "register",
    "rho_spectrum",
    "rho_triplet_loss",
    "soft_triple_loss",
    "triplet_margin_loss",
]
