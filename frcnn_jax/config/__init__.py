"""Experiment configs: defaults, command-line overrides, a run folder's config, building objects from a config."""
