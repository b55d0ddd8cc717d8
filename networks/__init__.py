"""I-MMSeg networks: configurations, the model, TransUNet baselines and inference helpers."""
