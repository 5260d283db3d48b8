"""Dictionaries: one file per kind on a small shared base (see base.py), found by name in REGISTRY."""

from scope.dictionaries.base import REGISTRY, Dictionary, DictionaryConfig, build, load
from scope.dictionaries.icfl import ICFL, ICFLConfig, matching_pursuit
from scope.dictionaries.jumprelu import JumpReLU, JumpReLUConfig
from scope.dictionaries.relu import ReLU, ReLUConfig
from scope.dictionaries.topk import TopK, TopKConfig
from scope.dictionaries.transcoder import (JumpReLUTranscoder, JumpReLUTranscoderConfig, TopKTranscoder,
                                          TopKTranscoderConfig, Transcoder)

__all__ = ["REGISTRY", "Dictionary", "DictionaryConfig", "ICFL", "ICFLConfig", "JumpReLU", "JumpReLUConfig",
           "JumpReLUTranscoder", "JumpReLUTranscoderConfig", "ReLU", "ReLUConfig", "TopK", "TopKConfig", "TopKTranscoder",
           "TopKTranscoderConfig", "Transcoder", "build", "load", "matching_pursuit"]
