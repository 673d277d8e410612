"""The Ray runtime under every stage: actor groups with deadlines (`group`), DeepSpeed rank groups
(`ds_group`), cluster checks and `ray.init` (`cluster`, `connect`), the reaper that ends a run's
actors with its driver (`reaper`), shipping model directories to nodes (`files`), CPU core pinning
(`cpu`). Nothing here knows about RL, SFT or reward models."""
