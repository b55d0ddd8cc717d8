"""Datasets: raw layouts, the synthetic phantom, preprocessing geometry, and training/test datasets."""
