"""SEMINAR (arXiv 2407.10714): lifelong multi-modal (query, item) sequences, the pretraining search
unit (PSU) and a two-stage (GSU top-K, ESU target attention) ranking model with exact or
product-quantised GSU scoring. Its own trainer, as `mvhan_jax.ranking`: the model is target-aware (a
user's representation depends on the candidate), so it cannot be served from a two-tower index.
"""
