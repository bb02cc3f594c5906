"""Evaluation: sample metrics (FID/sFID, precision/recall, FD-encoder) against cached references,
representation metrics of a run (RA, CKNNA, linear probe), and the evaluator the training loop calls."""

from vrpo.errors import EvalError
from vrpo.eval.alignment import cknna, linear_probe_accuracy, representation_alignment
from vrpo.eval.frechet import feature_statistics, frechet_distance, frechet_distance_from_features
from vrpo.eval.inception import (
    InceptionFeatures,
    InceptionScoreUnavailableError,
    InceptionUnavailableError,
    feature_extractor_info,
    find_inception_weights,
    inception_score,
)
from vrpo.eval.prdc import precision_recall
from vrpo.eval.refstats import dataset_fingerprint, load_reference_stats, save_reference_stats

__all__ = [
    "EvalError",
    "InceptionFeatures",
    "InceptionScoreUnavailableError",
    "InceptionUnavailableError",
    "cknna",
    "dataset_fingerprint",
    "feature_extractor_info",
    "feature_statistics",
    "find_inception_weights",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_score",
    "linear_probe_accuracy",
    "load_reference_stats",
    "precision_recall",
    "representation_alignment",
    "save_reference_stats",
]
