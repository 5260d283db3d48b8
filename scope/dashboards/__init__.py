"""Feature dashboards: statistics from a store in one pass, a static site, a Neuronpedia export."""

from scope.dashboards.neuronpedia import write_neuronpedia
from scope.dashboards.publish import Published, decoder_directions, publish
from scope.dashboards.results import FeatureStats
from scope.dashboards.site import render_site
from scope.dashboards.stats import StatsConfig, feature_stats, parse_features

__all__ = ["FeatureStats", "Published", "StatsConfig", "decoder_directions", "feature_stats", "parse_features",
           "publish", "render_site", "write_neuronpedia"]
