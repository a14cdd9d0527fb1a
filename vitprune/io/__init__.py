"""Model files in and out: loaders (timm, weights, pickles, Hugging Face, .pt2), pickle-free save, the allowlist, images, output checks."""
