"""Where work runs: the device, the independent units of desensitize.runtime.compute (in-process or a
Dask cluster), and training across torchrun processes."""
