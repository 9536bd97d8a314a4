"""Models: a backbone (digits CNN, open_clip tower, timm model) plus a linear head."""
