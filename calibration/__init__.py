"""hbi_calibration: INT8 calibration data, Q/DQ quantization and the accuracy gate (``hbi-export calibrate``).

The folder is ``calibration/`` in the repository and the package is installed as ``hbi_calibration``; import it
by that name (see docs/architecture.md, "Packaging"). Modules: ``data`` (videos through the runtime's decoder,
split, streaming reader), ``quantize`` (schemes, fallback steps, ORT ``quantize_static``), ``gate`` (metrics and
decision), ``pipeline`` (:func:`hbi_calibration.pipeline.calibrate_package`), ``cli`` (the command). See
docs/calibration.md.
"""
