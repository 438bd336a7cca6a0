"""Inference backends. Each backend is one module implementing `base.Backend`."""
