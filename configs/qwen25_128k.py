"""The L2A recipe (L2A.md) for a local Qwen2.5 checkpoint, extended from 32K to 128K tokens:

    python train.py --config configs/qwen25_128k.py --config.model.checkpoint=/data/Qwen2.5-7B \
        --config.data.files=/data/long_docs/

Every layer becomes an L2A layer (window 4095, tau 0.1); rope_theta 5e6 and 131072 positions;
sequences of 131072 tokens packed; attention, norms and routers train (MLPs and embeddings
frozen); AdamW 5e-5 with 209 warm-up steps and cosine decay over 3973 steps, gradient clipping
1.0; the sparsity weight rises linearly from 0 after warm-up to 1e-8; one step in ten runs the
global branch densely. Without data.files the embedded corpus is used (far too small for a
real run)."""

from l2a_jax.training.run_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/qwen25_128k"
    c.model.init = "checkpoint"
    c.model.dtype = "bfloat16"
    c.model.max_position_embeddings = 131072
    c.model.rope_theta = 5e6
    c.l2a.window = 4095
    c.l2a.tau = 0.1
    c.data.tokenizer = "qwen"  # the Qwen2.5/Qwen3 vocabulary; or the checkpoint directory
    c.data.seq_len = 131072
    c.data.batch_size = 8
    c.data.needle_rate = 0.05
    c.train.steps = 3973
    c.train.learning_rate = 5e-5
    c.train.warmup_steps = 209
    c.train.grad_clip = 1.0
    c.train.sparsity_weight = 1e-8
    c.train.sparsity_warmup_steps = 209
    c.train.sparsity_ramp = "linear"
    c.train.dense_step_prob = 0.1
    c.train.trainable = "recipe"
    c.train.checkpoint_every = 100
    c.train.remat = "full"  # a 128K sequence's activations would not fit otherwise
    return c
