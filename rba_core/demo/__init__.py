"""Offline demo assets: scikit-learn digits data and a tiny ViT trained on them."""
