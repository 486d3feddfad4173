"""Whole-image inference: sliding windows, detection decoding and NMS, instance assembly.

Modules: `windows` (tiling, batching, blending), `detections` (FCOS decoding, global NMS),
`instances` (`boxes` and `watershed` label maps), `predictor` (`predict_image`,
`make_predict_windows`).
"""
