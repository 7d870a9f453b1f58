"""hbi_training: how models learn (losses, the Banzhaf estimator, data, training loops).

The folder is ``training/`` in the repository and the package is installed as ``hbi_training``; import it by
that name (see docs/architecture.md, "Packaging").

- :mod:`.losses`: per-level InfoNCE, Banzhaf KL, self-distillation; :class:`~.losses.HBILoss`.
- :mod:`.banzhaf`: the estimator network and the Monte-Carlo Banzhaf interaction labels.
- :mod:`.levels`: the per-level scores and matched-pair maps the losses need, from the model's sides.
- :mod:`.optim`: official parameter groups, warmup-cosine schedule, ``finetune`` / ``scratch`` presets.
- :mod:`.tasks`, :mod:`.estimator`: what the loop optimises (the HBI model; the estimator).
- :mod:`.loop`, :mod:`.batches`, :mod:`.checkpoint`, :mod:`.progress`, :mod:`.evaluate`: the training loop.
- :mod:`.runs`, :mod:`.cli`: the ``hbi-train`` command line.
- :mod:`.data`: the synthetic video-caption set.
"""
