"""Training of the bundled demo model (a reduced ELoFTR config trained on scikit-image photos).

Nothing in here is needed at inference time; `matchanything train-demo` and the device
script use it. torch is imported by the submodules that need it.
"""
