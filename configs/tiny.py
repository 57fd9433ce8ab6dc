"""The README's main job: a small L2A model trained from scratch on the embedded corpus (the
Python help topics) with generated needle tasks mixed in, on a CPU in a few minutes."""

from l2a_jax.training.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/tiny"
    c.model.init = "random"
    c.model.architecture = "Qwen3ForCausalLM"
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 32
    c.model.rope_theta = 10000.0
    c.l2a.window = 64
    c.data.tokenizer = "bytes"
    c.data.seq_len = 512
    c.data.batch_size = 6
    c.data.needle_rate = 0.25
    c.data.needle_haystacks = ("noise",)
    c.train.steps = 150
    c.train.trainable = "all"
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 15
    c.train.sparsity_weight = 2e-3
    c.train.route_all_steps = 40
    c.train.sparsity_warmup_steps = 40
    c.train.checkpoint_every = 25
    c.train.log_every = 10
    return c
