"""Frontends: capture a model as a graph and map it onto the neutral op graph."""
