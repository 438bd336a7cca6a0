"""MatchAnything-RoMa: DINOv2 + VGG19-BN encoder, Gaussian-process match, ConvRefiners, dense warp.

Modules: `preprocess` (web-UI stage, antialiased bicubic stretch, numpy), `dinov2`, `model`
(the network, torch), `gp` (reference and export-ready GP solves), `sampling` (balanced and
top-k sparse matches), `pipeline` (the `roma` variant pipeline), `weights` (checkpoint files).
"""
