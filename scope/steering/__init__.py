"""Steering: rank-1 vectors trained with RePS or the LM objective, DiffMean from a store, steering and
null-out interventions, and offline AxBench-style scoring. See docs/methods/reps.md.

Submodules import the model stack lazily where they can; the names below are the public API.
"""

from scope.steering.concepts import ConceptData, ConceptExample, EvalPrompt, build_concept, load_concept, load_jsonl
from scope.steering.diffmean import diffmean
from scope.steering.evaluate import DEFAULT_ALPHAS, SteeringResult, alpha_figure, evaluate_vector
from scope.steering.generate import RowSteer, generate
from scope.steering.interventions import null_out, phi_null, phi_steer, resid_hook, steering
from scope.steering.pipeline import concept_data, make_vector, scorer_for
from scope.steering.reps import SteerConfig, lm_loss, reps_loss, train_vector
from scope.steering.scoring import Scorer, fit_scorer, harmonic_mean, load_scorer
from scope.steering.vector import SteeringVector, load_vector

__all__ = ["DEFAULT_ALPHAS", "ConceptData", "ConceptExample", "EvalPrompt", "RowSteer", "Scorer", "SteerConfig",
           "SteeringResult", "SteeringVector", "alpha_figure", "build_concept", "concept_data", "diffmean",
           "evaluate_vector", "fit_scorer", "generate", "harmonic_mean", "lm_loss", "load_concept", "load_jsonl",
           "load_scorer", "load_vector", "make_vector", "null_out", "phi_null", "phi_steer", "reps_loss",
           "resid_hook", "scorer_for", "steering", "train_vector"]
