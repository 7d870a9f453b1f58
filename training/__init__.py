"""hbi_training: how models learn (losses, the Banzhaf estimator, data, training loops).

The folder is ``training/`` in the repository and the package is installed as ``hbi_training``; import it by
that name (see docs/architecture.md, "Packaging").
"""
