"""LoRA fine-tuning (installed as `gptoss_jax.train`): adapters, the sharded train step, the finetune loop."""
