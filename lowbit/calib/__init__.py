"""The calibration layer: `QuantConfig`, the block-wise engine (`lowbit.quantize`), its
methods (`lowbit.calib.methods`), losses, data, resume and saliency.

Nothing is imported here, so that `lowbit.calib.config` loads without the compiled kernels.
"""
