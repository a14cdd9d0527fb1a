"""The neutral op graph and the ViT analysis on it."""
