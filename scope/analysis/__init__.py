"""Analyses of a model's internals that work from the store or from forward passes over text."""
