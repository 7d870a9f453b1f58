"""``hbi-run bench``: latency and throughput per stage and backend, one record format for edge and datacenter.

* :mod:`.run`: :func:`~hbi_runtime.bench.run.run_bench` (package + backend + device -> an ``hbi.bench/1`` record)
  and the text table;
* :mod:`.stages`: what is measured (text, video, score, decode, retrieve) and the synthetic inputs;
* :mod:`.timing`: timed calls, p50 / p90 / p99, a result row, peak RSS;
* :mod:`.records`: the record envelope: device (CPU model / flags, GPUs with compute capability, Jetson model and
  power mode) and library versions (torch and TensorRT looked up, never imported);
* :mod:`.peak`: the fp32 GEMM peak (numpy sgemm in a clean subprocess, ONNX Runtime MatMul) and memory bandwidth,
  for "fraction of the bound" figures (``benchmarks/``);
* :mod:`.plot`: latency and throughput against batch size (matplotlib, imported only when plotting);
* :mod:`.cli`: the Typer command. docs/bench.md describes the record and how to read it.
"""
