"""Pruning and quantization criteria (TPV, JBR, quantization-noise trace, baselines) as torch-pruning Importances."""
