"""Builders: the only code that reads an ml_collections ConfigDict.

Each submodule turns one part of a config into typed library objects (models, SDEs, data
pipelines, samplers, optimisers); everything below this layer takes keyword arguments.
"""
