"""Training stages besides RL, each a short driver over DeepSpeed actor groups:
SFT (`sft.py`), reward-model training (`reward_model.py`), and the SFT -> RM -> RL recipe
(`recipe.py`)."""
