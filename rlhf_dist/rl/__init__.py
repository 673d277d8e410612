"""The RL stage's controller: `trainer` (one step = five numbered phases), `generation` (phase 1:
prompts drawn, sampling launched on the engines and collected, the async prefetch), `launcher`
(every actor group of an RL run started and checked), `metrics` (step and eval metrics as pure
functions). The driver around it (fit, warm-up, summary) is rlhf_dist.stages.rl."""
