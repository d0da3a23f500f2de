"""The strategies ``compress.plan.plan_bits`` composes: predictors of TPV_l(c) and the HAWQ-V2 score, allocators
(exact knapsack, uniform, random) and costs per budget kind (bits, bytes, BOPs, latency table)."""
