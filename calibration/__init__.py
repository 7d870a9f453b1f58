"""hbi_calibration: INT8 calibration data, Q/DQ quantization and the accuracy gate.

The folder is ``calibration/`` in the repository and the package is installed as ``hbi_calibration``; import it
by that name (see docs/architecture.md, "Packaging").
"""
