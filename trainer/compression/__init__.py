"""The compression library every post-training plugin (pruning, quantization) calls, one place each:

- ``config``: config blocks (calibration samples, lm-eval, density/N:M checks); torch-free;
- ``pruning``: the base of pruning plugins (targets, one-pruner rule, report); torch-free at import;
- ``quantizing``: the base of quantization plugins (config keys, checks, resumable layer loop, QuantLinear swap,
  kept zeros, bits/size report); torch-free at import;
- ``calibration``: calibration samples by seed; ``replay``: block capture/replay (sequential calibration;
  hooked forwards, input capture and layer probes for methods that replay blocks themselves, e.g. CBQ);
- ``masks``: masks and N:M patterns; ``scores``: magnitude/Wanda scores and input statistics;
- ``hessian``: the layer-input Hessian, its damped Cholesky inverse, one CPU thread for column sweeps (SparseGPT, GPTQ);
- ``quant``: the uniform quantization grid (scales, zero points, codes) every quantization method shares;
- ``learn``: the engine's optimiser loop for methods that learn during calibration;
- ``state``: the resumable calibrate state; ``evaluation``: perplexity and lm-eval; ``report``: sparsity report.
"""
