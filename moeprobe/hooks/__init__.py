"""Capture: finding MoE layers in a model, reading their routing by contract, and the probe that records it.

A regular package (not a namespace package) so that import tools and type checkers see it. Importing it imports
nothing: ``moeprobe.record`` loads :mod:`moeprobe.hooks.probe` (and torch) on first use.
"""
